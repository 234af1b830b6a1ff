//! The decoder-only transformer shared by every model: embeddings, N pre-norm blocks of
//! grouped-query attention (optional per-head QK-norm, optional q/k/v and o bias, rotary
//! embeddings, full or partial) and a feed-forward block — a SwiGLU MLP, or a mixture of
//! experts ([`crate::moe`]) — a final RMSNorm and the LM head (tied or not). References:
//! transformers `modeling_llama.py` / `modeling_qwen3.py` (`Qwen3Attention`, `Qwen3MLP`,
//! `Qwen3DecoderLayer`, `eager_attention_forward`), `modeling_qwen3_moe.py`,
//! `modeling_glm4_moe.py`.
//!
//! A forward pass computes one scheduler step: a flat batch of tokens from many sequences
//! ([`StepBatch`]), whose keys and values go to a paged KV cache ([`KvPool`]) and whose
//! attention reads each sequence's blocks ([`inference_pio_kernels::paged`]).

use crate::error::EngineError;
use crate::hf_config::DecoderConfig;
use crate::moe::{Mlp, MoeBlock, MoeSpec, moe_tensors};
use crate::rope;
use crate::tensor_parallel::{Collective, RankShard, TpRank};
use crate::vision::{VisionSpec, VisionTower, vision_tensors};
use crate::weights::{Checkpoint, StoredLinear, burn_dtype};
use inference_pio_kernels::quant::{QuantizedLinear, QuantizedMatrix};
use burn::tensor::{DType as BurnDType, Device, IndexingUpdateOp, Int, Tensor, TensorData};
use inference_pio_core::config::Quantization;
use inference_pio_core::types::DType;
use inference_pio_kernels::paged::{PagedLayout, Span, paged_attention};
use inference_pio_kernels::memory::outside_pools;
use inference_pio_kernels::rotary::rotate_into_pages;
use inference_pio_kernels::{KvPages, KvStorage, add_rms_norm, concat_outputs, linear, matvec, rms_norm, split_parts, split_weight};
use std::sync::Arc;

/// One scheduler step as the decoder computes it: the tokens of many sequences, flat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub tokens: Vec<u32>,
    /// Each token's position in its sequence (its rotary angle).
    pub positions: Vec<usize>,
    /// The cache slot each token's keys and values go to.
    pub slots: Vec<usize>,
    /// One per sequence, in the order of `tokens`; decode rows (one token) first.
    pub spans: Vec<Span>,
    /// Indices into `tokens` whose logits are wanted, in the order returned.
    pub logit_rows: Vec<usize>,
    /// Multimodal rotary positions (`[temporal, height, width]` per token; a text token has
    /// its position on all three) for models with M-RoPE; empty: `positions`.
    pub mrope: Vec<[usize; 3]>,
}

/// Image features placed into a step (a vision-language model's prefill): the rows of the
/// step that are image tokens get `embeds` in place of their token embeddings, and
/// `deepstack[l]` added to their hidden states after decoder layer `l` (DeepStack).
#[derive(Clone)]
pub struct StepVision {
    /// Step rows `[n]`.
    pub rows: Tensor<1, Int>,
    /// `[n, hidden]`.
    pub embeds: Tensor<2>,
    /// `[n, hidden]` per layer from the first.
    pub deepstack: Vec<Tensor<2>>,
}

/// The paged KV cache's tensors: per layer, keys and values `[(blocks + 1) * block_tokens,
/// kv_heads, head_dim]` in the model's dtype or as int8 with their scales ([`KvPages`]),
/// preallocated at load. The extra last block is scratch, never handed to a sequence: the
/// padding rows of a fixed-shape (CUDA-graph) decode step write and read there.
pub struct KvPool {
    layers: Vec<Option<(KvPages, KvPages)>>,
    block_tokens: usize,
    blocks: usize,
}

impl KvPool {
    /// Bytes one block takes over all layers.
    pub fn block_bytes(config: &DecoderConfig, storage: KvStorage, block_tokens: usize) -> u64 {
        (config.num_hidden_layers * 2 * block_tokens * config.num_key_value_heads) as u64 * storage.head_bytes(config.head_dim)
    }

    /// Blocks sequences may use (the scratch block not counted).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The first slot of the scratch block.
    pub fn scratch_slot(&self) -> usize {
        self.blocks * self.block_tokens
    }

    /// Whether every layer's tensors are uniquely owned, so that writes land in place (what a
    /// recorded CUDA graph, which replays against fixed buffers, relies on).
    pub fn is_unique(&self) -> bool {
        self.layers.iter().flatten().all(|(k, v)| k.can_mut() && v.can_mut())
    }
}

/// One step's inputs, on the device: token ids `[t]`, rotary `cos`/`sin` `[1, 1, t,
/// rotary_dim]`, the cache slot of each token `[t]`, attention's layout, and the rows whose
/// logits are wanted (`None`: every row).
pub struct StepTensors {
    pub tokens: Tensor<1, Int>,
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
    pub slots: Tensor<1, Int>,
    pub layout: PagedLayout,
    pub logit_rows: Option<Tensor<1, Int>>,
    pub vision: Option<StepVision>,
}

/// What differs between decoder families, beyond what the engine reads from `config.json`
/// itself. A model crate builds it from the config (its own keys are in
/// [`DecoderConfig::raw`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderSpec {
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, GLM-4.5 with `use_qk_norm`).
    pub qk_norm: bool,
    /// Whether `o_proj` has a bias (Llama / Qwen: when `attention_bias`; GLM: never).
    pub o_proj_bias: bool,
    /// Mixture-of-experts layers, if the model has them.
    pub moe: Option<MoeSpec>,
    /// Where the text decoder's weights live: `{prefix}.embed_tokens`, `{prefix}.layers.N`,
    /// `{prefix}.norm` (`model`; Qwen3-VL: `model.language_model`).
    pub prefix: String,
    /// Interleaved multimodal RoPE's `mrope_section` (Qwen3-VL), if the model has it.
    pub mrope_section: Option<[usize; 3]>,
    /// The vision tower, for a vision-language model.
    pub vision: Option<VisionSpec>,
}

impl DecoderSpec {
    /// A dense decoder whose q/k/v/o biases all follow `attention_bias`.
    pub fn dense(config: &DecoderConfig, qk_norm: bool) -> Self {
        Self { qk_norm, o_proj_bias: config.attention_bias, moe: None, prefix: "model".into(), mrope_section: None, vision: None }
    }

    fn is_sparse(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.sparse_layers.get(layer).copied().unwrap_or(false))
    }
}

enum FeedForward {
    Dense(Box<Mlp>),
    Moe(Box<MoeBlock>),
}

/// The token embeddings (one per model: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Embedding {
    /// `[vocab, hidden]` in the model's dtype.
    Dense(Tensor<2>),
    /// A GGUF file's quantized table kept as stored (on the CPU): the rows a step needs are
    /// dequantized when looked up.
    Quantized(std::sync::Arc<QuantizedMatrix>),
}

impl Embedding {
    /// The rows of `tokens`, `[t, hidden]` in `dtype`.
    fn lookup(&self, tokens: &Tensor<1, Int>, dtype: BurnDType) -> Tensor<2> {
        match self {
            Embedding::Dense(table) => table.clone().select(0, tokens.clone()),
            Embedding::Quantized(table) => {
                let device = tokens.device();
                // Token ids were checked against the vocabulary when the step was built.
                let ids = tokens.clone().into_data().convert::<i64>().try_to_vec::<i64>().unwrap_or_default();
                let rows = table.dequantize_rows(ids.iter().map(|&id| id.clamp(0, table.rows as i64 - 1) as usize));
                let x = Tensor::<2>::from_data(TensorData::new(rows, [ids.len(), table.cols]), (&device, BurnDType::F32));
                if dtype == BurnDType::F32 { x } else { x.cast(dtype) }
            }
        }
    }
}

/// A linear layer's weight as placed on the device.
enum Weight {
    /// HF `[out, in]` layout split into column blocks, `[parts, out, in / parts]`
    /// ([`inference_pio_kernels::split_weight`]; one block on the CPU and where cuBLAS runs).
    Dense(Tensor<3>),
    /// Integer codes in groups with scales and offsets ([`inference_pio_kernels::quant`]).
    Quantized(QuantizedLinear),
}

impl Weight {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Weight::Dense(w) => linear(x, w),
            Weight::Quantized(q) => q.forward(x),
        }
    }
}

/// A linear layer `y = x · wᵀ + b`, its weight dense or quantized
/// ([`Checkpoint::load_linear_stored`]).
pub(crate) struct Linear {
    /// Usually one weight. Projections fused along `out` whose weights are stored
    /// differently (a GGUF file's q in Q4_K beside its v in Q6_K) stay separate, their outputs
    /// side by side.
    weights: Vec<Weight>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub(crate) fn load(ckpt: &Checkpoint, prefix: &str, out: usize, inp: usize, bias: bool, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        Self::load_fused(ckpt, &[prefix.to_string()], &[out], inp, bias, device, dtype)
    }

    /// Several projections of the same input as one (`q`, `k`, `v`): their weights
    /// concatenated along `out`, so one matrix product (one kernel) computes them all; the
    /// caller splits the output at the parts' widths.
    pub(crate) fn load_fused(ckpt: &Checkpoint, prefixes: &[String], outs: &[usize], inp: usize, bias: bool, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let mut stored = Vec::with_capacity(prefixes.len());
        let mut biases = Vec::new();
        for (p, &out) in prefixes.iter().zip(outs) {
            stored.push(ckpt.load_linear_stored(&format!("{p}.weight"), [out, inp], device, dtype)?);
            if bias {
                biases.push(ckpt.load::<1>(&format!("{p}.bias"), [out], device, dtype)?);
            }
        }
        let bias = bias.then(|| Tensor::cat(biases, 0));
        Ok(Self { weights: place(ckpt, stored, device), bias })
    }

    /// A weight already loaded (`[out, in]`), split for the device as [`Self::load`] does.
    pub(crate) fn from_parts(weight: Tensor<2>, bias: Option<Tensor<1>>, device: &Device) -> Self {
        let inp = weight.dims()[1];
        Self { weights: vec![Weight::Dense(split_weight(weight, split_parts(inp, device)))], bias }
    }

    /// `y = x · wᵀ` of one f32 row on the host, where every weight is quantized in host
    /// memory and there is no bias (the products [`Self::forward`] runs for one row on the
    /// CPU, without its tensors); `None` otherwise.
    pub(crate) fn host_row(&self, x: &[f32]) -> Option<Vec<f32>> {
        // Each weight's outputs appended as a block (collected value by value, the flattening
        // took a sixtieth of a small Qwen3-MoE's decode).
        let mut parts = self.host_matrices()?.into_iter().map(|(m, activations)| m.matmul(x, 1, activations));
        let mut out = parts.next()?;
        for part in parts {
            out.extend_from_slice(&part);
        }
        Some(out)
    }

    /// [`Self::host_row`] of `n` rows `x [n, in]`: `[n, out]`, each weight's products of the
    /// `n` rows at once (what [`Self::forward`] runs for them on the CPU, without its tensors),
    /// its outputs side by side in each row.
    pub(crate) fn host_rows(&self, x: &[f32], n: usize) -> Option<Vec<f32>> {
        if n == 1 {
            return self.host_row(x);
        }
        if n > self.host_rows_limit() {
            return None;
        }
        let parts: Vec<Vec<f32>> = self.host_matrices()?.into_iter().map(|(m, activations)| m.matmul(x, n, activations)).collect();
        if parts.len() == 1 {
            return parts.into_iter().next();
        }
        let width: usize = parts.iter().map(|p| p.len() / n).sum();
        let mut out = Vec::with_capacity(n * width);
        for r in 0..n {
            for p in &parts {
                let w = p.len() / n;
                out.extend_from_slice(&p[r * w..(r + 1) * w]);
            }
        }
        Some(out)
    }

    /// The most rows [`Self::host_rows`] takes (each weight's products read its codes for up
    /// to that many; more go through [`Self::forward`]'s dequantized slices); 0 where
    /// [`Self::host_row`] does not apply.
    pub(crate) fn host_rows_limit(&self) -> usize {
        self.host_matrices().map_or(0, |ms| ms.iter().map(|(m, activations)| m.fused_row_limit(*activations)).min().unwrap_or(0))
    }

    /// Whether [`Self::host_row`] applies.
    pub(crate) fn is_host_quantized(&self) -> bool {
        // As `host_matrices`, without collecting them: a MoE step asks this of every expert's
        // two weights each layer (a small Qwen3-MoE's decode spent about 2 % of its time
        // building and dropping those lists).
        self.bias.is_none() && self.weights.iter().all(|w| matches!(w, Weight::Quantized(q) if q.host_matrix().is_some()))
    }

    /// Each weight's matrix in host memory and the activations its products take, where every
    /// weight has one and there is no bias.
    fn host_matrices(&self) -> Option<Vec<(&QuantizedMatrix, inference_pio_kernels::quant::Activations)>> {
        if self.bias.is_some() {
            return None;
        }
        self.weights
            .iter()
            .map(|w| match w {
                Weight::Quantized(q) => q.host_matrix().map(|m| (m, q.activations(burn::tensor::DType::F32))),
                Weight::Dense(_) => None,
            })
            .collect()
    }

    /// One quantized weight, no bias.
    #[cfg(test)]
    pub(crate) fn from_quantized(weight: QuantizedLinear) -> Self {
        Self { weights: vec![Weight::Quantized(weight)], bias: None }
    }

    /// `x [rows, in] -> [rows, out]`.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = match self.weights.as_slice() {
            [w] => w.forward(x),
            ws => Tensor::cat(ws.iter().map(|w| w.forward(x.clone())).collect(), 1),
        };
        match &self.bias {
            Some(b) => y.add(b.clone().unsqueeze()),
            None => y,
        }
    }

    /// `silu(gate) * up` of this `[gate | up]` projection, `x [rows, in] -> [rows, out / 2]`:
    /// in the product's kernel where it runs for these rows (one dense weight, no bias:
    /// [`matvec::swiglu_kernel_applies`]), else the product, then
    /// [`inference_pio_kernels::swiglu_halves`]. The same bits either way.
    pub(crate) fn forward_swiglu(&self, x: Tensor<2>) -> Tensor<2> {
        if let ([Weight::Dense(w)], None) = (self.weights.as_slice(), &self.bias)
            && x.dtype() == w.dtype()
            && matvec::swiglu_kernel_applies(x.dims()[0], &x.device())
        {
            return matvec::split_matvec_swiglu(x, w);
        }
        inference_pio_kernels::swiglu_halves(self.forward(x))
    }
}

/// Places loaded weights, joining neighbours stored alike: dense ones into one split weight,
/// quantized ones of the same layout into one quantized weight.
fn place(ckpt: &Checkpoint, stored: Vec<StoredLinear>, device: &Device) -> Vec<Weight> {
    let mut out: Vec<Weight> = Vec::new();
    let mut dense: Vec<Tensor<2>> = Vec::new();
    let mut quantized: Vec<QuantizedMatrix> = Vec::new();
    let flush_dense = |dense: &mut Vec<Tensor<2>>, out: &mut Vec<Weight>| {
        if !dense.is_empty() {
            let inp = dense[0].dims()[1];
            let parts = split_parts(inp, device);
            out.push(Weight::Dense(concat_outputs(dense.drain(..).map(|w| split_weight(w, parts)).collect())));
        }
    };
    let flush_quantized = |quantized: &mut Vec<QuantizedMatrix>, out: &mut Vec<Weight>| {
        if quantized.is_empty() {
            return;
        }
        let parts: Vec<QuantizedMatrix> = std::mem::take(quantized);
        match QuantizedMatrix::concat_rows(&parts) {
            Some(joined) => out.push(Weight::Quantized(ckpt.place_quantized(joined, device))),
            None => out.extend(parts.into_iter().map(|m| Weight::Quantized(ckpt.place_quantized(m, device)))),
        }
    };
    for s in stored {
        match s {
            StoredLinear::Dense(w) => {
                flush_quantized(&mut quantized, &mut out);
                dense.push(w);
            }
            StoredLinear::Quantized(m) => {
                flush_dense(&mut dense, &mut out);
                if quantized.last().is_some_and(|l| (l.bits, l.group) != (m.bits, m.group)) {
                    flush_quantized(&mut quantized, &mut out);
                }
                quantized.push(m);
            }
        }
    }
    flush_dense(&mut dense, &mut out);
    flush_quantized(&mut quantized, &mut out);
    out
}

struct Block {
    input_norm: Tensor<1>,
    /// `q_proj`, `k_proj` and `v_proj` fused ([`Linear::load_fused`]): `[q | k | v]` out.
    qkv: Linear,
    o: Linear,
    /// `q_norm` once per query head, then `k_norm` once per key head, `[heads + kv_heads,
    /// head_dim]`: the QK-norm of queries and keys runs as one normalisation.
    qk_norm: Option<Tensor<2>>,
    post_norm: Tensor<1>,
    mlp: FeedForward,
}

/// A loaded dense decoder.
pub struct Decoder {
    pub config: DecoderConfig,
    pub spec: DecoderSpec,
    pub dtype: DType,
    pub device: Device,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor<1>,
    /// `lm_head.weight`, or (tied) the embeddings: a split copy of the dense table (on the CPU,
    /// one block: a view of it), or the same quantized rows.
    /// of the embeddings when tied (on the CPU, one block: a view of them).
    lm_head: Linear,
    inv_freq: Vec<f32>,
    /// The vision tower of a vision-language model.
    pub vision: Option<VisionTower>,
    /// A tensor-parallel rank's place in its group (`config` then holds its heads and inner
    /// rows; [`crate::tensor_parallel`]).
    tp: Option<TpRank>,
    /// How its KV pools store keys and values (`kv_cache_dtype`): the model's dtype unless
    /// [`Self::store_kv_as`] changed it.
    kv_storage: KvStorage,
}

/// Names and shapes of every tensor a decoder with this config needs.
pub fn expected_tensors(c: &DecoderConfig, spec: &DecoderSpec) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let m = &spec.prefix;
    let mut out = vec![(format!("{m}.embed_tokens.weight"), vec![c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("{m}.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if c.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if spec.o_proj_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        if spec.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        match &spec.moe {
            Some(moe) if spec.is_sparse(l) => out.extend(moe_tensors(moe, &format!("{p}.mlp"), h)),
            _ => out.extend(Mlp::tensors(&format!("{p}.mlp"), h, i)),
        }
    }
    out.push((format!("{m}.norm.weight"), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    if let Some(v) = &spec.vision {
        out.extend(vision_tensors(&v.config, &v.prefix));
    }
    out
}

/// Parameters of a decoder with this config and spec.
pub fn parameter_count(c: &DecoderConfig, spec: &DecoderSpec) -> u64 {
    expected_tensors(c, spec).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
}

/// Bytes the weights take in `dtype`.
pub fn weight_bytes(c: &DecoderConfig, spec: &DecoderSpec, dtype: DType) -> u64 {
    parameter_count(c, spec) * dtype.size_bytes()
}

/// About the bytes the weights take with their decoder's linear weights quantized at load as
/// `quantization` asks (int8: a byte per weight plus a scale and offset per row; int4: half a
/// byte plus both per 128; fp8: a byte plus both per 128): what the memory limits are checked
/// against before loading. A GGUF file's own quantization is not counted (its dense size is an
/// upper bound).
pub fn stored_weight_bytes(c: &DecoderConfig, spec: &DecoderSpec, dtype: DType, quantization: Option<Quantization>, quantize_lm_head: bool) -> u64 {
    let dense = weight_bytes(c, spec, dtype);
    let per_weight = match quantization {
        Some(Quantization::Int8) => 1.0,
        Some(Quantization::Int4) => 0.5 + 8.0 / 128.0,
        // A byte, and a scale and a (zero) offset per group of 128 of a row.
        Some(Quantization::Fp8) => 1.0 + 8.0 / 128.0,
        _ => return dense,
    };
    let layers = format!("{}.layers.", spec.prefix);
    let linear: u64 = expected_tensors(c, spec)
        .iter()
        .filter(|(name, shape)| name.starts_with(&layers) && name.ends_with("_proj.weight") && shape.len() == 2)
        .map(|(_, shape)| (shape[0] * shape[1]) as u64)
        .sum();
    let head = (c.vocab_size * c.hidden_size) as u64;
    let head_change = match (quantize_lm_head, c.tie_word_embeddings) {
        (false, _) => 0.0,
        // A quantized copy beside the dense lookup table.
        (true, true) => head as f64 * per_weight,
        (true, false) => head as f64 * per_weight - (head * dtype.size_bytes()) as f64,
    };
    ((dense - linear * dtype.size_bytes()) as f64 + linear as f64 * per_weight + head_change) as u64
}

impl Decoder {
    /// Checks every tensor's presence, dtype and shape, then loads them.
    pub fn load(config: DecoderConfig, spec: DecoderSpec, ckpt: &Checkpoint, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        Self::check_tensors(&config, &spec, ckpt)?;
        Self::load_checked(config, spec, ckpt, device, dtype, None)
    }

    fn check_tensors(config: &DecoderConfig, spec: &DecoderSpec, ckpt: &Checkpoint) -> Result<(), EngineError> {
        if config.hidden_act != "silu" {
            return Err(EngineError::Unsupported(format!("hidden_act `{}` is not supported (only silu)", config.hidden_act)));
        }
        for (name, shape) in expected_tensors(config, spec) {
            ckpt.check(&name, &shape)?;
        }
        Ok(())
    }

    /// One tensor-parallel rank of the model (`shard`, from
    /// [`crate::tensor_parallel::plan`]): the whole checkpoint is checked, then only this
    /// rank's slices are read; its forward pass meets the other ranks' in `group`.
    pub fn load_rank(
        config: DecoderConfig,
        spec: DecoderSpec,
        ckpt: &mut Checkpoint,
        device: &Device,
        dtype: DType,
        shard: &RankShard,
        group: Arc<dyn Collective>,
    ) -> Result<Self, EngineError> {
        Self::check_tensors(&config, &spec, ckpt)?;
        ckpt.set_shard(shard.rules(&config, &spec));
        let tp = TpRank { shard: shard.clone(), group };
        Self::load_checked(shard.local_config(&config), shard.local_spec(&spec), ckpt, device, dtype, Some(tp))
    }

    fn load_checked(config: DecoderConfig, spec: DecoderSpec, ckpt: &Checkpoint, device: &Device, dtype: DType, tp: Option<TpRank>) -> Result<Self, EngineError> {
        if let Some(section) = spec.mrope_section
            && 2 * section.iter().sum::<usize>() != config.rotary_dim()
        {
            return Err(EngineError::Config(format!("mrope_section {section:?} must add up to half the rotary dimension {}", config.rotary_dim())));
        }
        let m = spec.prefix.clone();
        let c = &config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let bias = c.attention_bias;
        if let Some(moe) = &spec.moe {
            moe.validate(c.num_hidden_layers)?;
        }
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("{m}.layers.{l}");
            let mlp = match &spec.moe {
                Some(moe) if spec.is_sparse(l) => FeedForward::Moe(Box::new(MoeBlock::load_experts(
                    moe,
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    device,
                    dtype,
                    tp.as_ref().and_then(|tp| tp.shard.experts.clone()).unwrap_or(0..moe.num_experts),
                )?)),
                _ => FeedForward::Dense(Box::new(Mlp::load(ckpt, &format!("{p}.mlp"), h, i, device, dtype)?)),
            };
            blocks.push(Block {
                input_norm: ckpt.load(&format!("{p}.input_layernorm.weight"), [h], device, dtype)?,
                qkv: Linear::load_fused(
                    ckpt,
                    &["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}")),
                    &[q, kv, kv],
                    h,
                    bias,
                    device,
                    dtype,
                )?,
                o: Linear::load(ckpt, &format!("{p}.self_attn.o_proj"), h, q, spec.o_proj_bias, device, dtype)?,
                qk_norm: if spec.qk_norm {
                    let per_head = |name: &str, heads: usize| -> Result<Tensor<2>, EngineError> {
                        let w: Tensor<1> = ckpt.load(&format!("{p}.self_attn.{name}.weight"), [d], device, dtype)?;
                        Ok(w.reshape([1, d]).repeat_dim(0, heads))
                    };
                    Some(Tensor::cat(vec![per_head("q_norm", c.num_attention_heads)?, per_head("k_norm", c.num_key_value_heads)?], 0))
                } else {
                    None
                },
                post_norm: ckpt.load(&format!("{p}.post_attention_layernorm.weight"), [h], device, dtype)?,
                mlp,
            });
            // The layer's conversion temporaries (a fused projection's parts, a GGUF slice's
            // codes) leave free pages between the weights that stay; handing them back per
            // layer keeps the load's peak resident memory near the loaded weights.
            crate::weights::return_free_heap_pages();
        }
        let embed_name = format!("{m}.embed_tokens.weight");
        // The rows of the vocabulary held: all, or a tensor-parallel rank's.
        let vocab = tp.as_ref().map_or(c.vocab_size, |tp| tp.shard.vocab.len());
        let (embed, lm_head) = match ckpt.load_stored_quantized(&embed_name, [vocab, h], device)? {
            // The file's quantized table, kept: on the CPU looked up row by row, and (tied)
            // the LM head.
            Some(table) if *device == Device::flex() => {
                ckpt.count_quantized(&table, dtype);
                let table = std::sync::Arc::new(table);
                let head = if c.tie_word_embeddings { Some(Linear { weights: vec![Weight::Quantized(ckpt.place_shared_quantized(table.clone(), device))], bias: None }) } else { None };
                (Embedding::Quantized(table), head)
            }
            // On a GPU the lookup stays a device gather (a recorded decode step reads its token
            // ids on the device), so the table is dense there; a tied LM head keeps the codes.
            Some(table) => {
                let head = if c.tie_word_embeddings {
                    ckpt.count_quantized(&table, dtype);
                    Some(Linear { weights: vec![Weight::Quantized(ckpt.place_quantized(table, device))], bias: None })
                } else {
                    None
                };
                (Embedding::Dense(ckpt.load(&embed_name, [vocab, h], device, dtype)?), head)
            }
            None => {
                let table = ckpt.load(&embed_name, [vocab, h], device, dtype)?;
                let head = match (c.tie_word_embeddings, ckpt.quantizes_lm_head()) {
                    (false, _) => None,
                    // `quantize_lm_head`: quantized from the table's values, the lookup dense.
                    (true, true) => Some(Linear::load(ckpt, &format!("{m}.embed_tokens"), vocab, h, false, device, dtype)?),
                    (true, false) => Some(Linear::from_parts(table.clone(), None, device)),
                };
                (Embedding::Dense(table), head)
            }
        };
        let lm_head = match lm_head {
            Some(head) => head,
            // `quantize_lm_head`: quantized as the other linear weights are.
            None if ckpt.quantizes_lm_head() => Linear::load(ckpt, "lm_head", vocab, h, false, device, dtype)?,
            // Untied: the file's quantized blocks when kept as stored, else dense.
            None => match ckpt.load_stored_quantized("lm_head.weight", [vocab, h], device)? {
                Some(q) => {
                    ckpt.count_quantized(&q, dtype);
                    Linear { weights: vec![Weight::Quantized(ckpt.place_quantized(q, device))], bias: None }
                }
                None => Linear::from_parts(ckpt.load("lm_head.weight", [vocab, h], device, dtype)?, None, device),
            },
        };
        let norm = ckpt.load(&format!("{m}.norm.weight"), [h], device, dtype)?;
        let inv_freq = rope::inverse_frequencies(&c.rope, c.rotary_dim());
        let vision = match &spec.vision {
            Some(v) => {
                if v.config.out_hidden_size != h {
                    return Err(EngineError::Config(format!("vision_config.out_hidden_size {} differs from the text hidden_size {h}", v.config.out_hidden_size)));
                }
                if v.config.deepstack_visual_indexes.len() > c.num_hidden_layers {
                    return Err(EngineError::Config("more DeepStack features than text decoder layers".into()));
                }
                Some(VisionTower::load(v.config.clone(), ckpt, &v.prefix, device, dtype)?)
            }
            None => None,
        };
        let kv_storage = KvStorage::Dense(burn_dtype(dtype));
        Ok(Self { config, spec, dtype, device: device.clone(), embed, blocks, norm, lm_head, inv_freq, vision, tp, kv_storage })
    }

    /// A KV pool of `blocks` blocks of `block_tokens` tokens, zeroed, stored as
    /// [`Self::store_kv_as`] last set (the model's dtype by default).
    pub fn new_kv_pool(&self, blocks: usize, block_tokens: usize) -> KvPool {
        self.new_kv_pool_of(blocks, block_tokens, self.kv_storage)
    }

    /// Stores its KV pools as `storage` from now on.
    pub fn store_kv_as(&mut self, storage: KvStorage) {
        self.kv_storage = storage;
    }

    /// A KV pool of `blocks` blocks of `block_tokens` tokens stored as `storage`, zeroed.
    pub fn new_kv_pool_of(&self, blocks: usize, block_tokens: usize, storage: KvStorage) -> KvPool {
        let c = &self.config;
        let shape = [(blocks + 1) * block_tokens, c.num_key_value_heads, c.head_dim];
        let (device, count) = (self.device.clone(), self.blocks.len());
        // Device allocations of their own, outside the activations' pools (`memory`).
        let layers = outside_pools(&self.device, move || {
            let zeros = || KvPages::zeroed(storage, shape, &device);
            (0..count).map(|_| Some((zeros(), zeros()))).collect()
        });
        KvPool { layers, block_tokens, blocks }
    }

    /// Computes one step: writes its keys and values to `kv` and returns the f32 logits of
    /// `batch.logit_rows`, `[rows, vocab]`.
    pub fn forward(&self, batch: &StepBatch, kv: &mut KvPool) -> Result<Tensor<2>, EngineError> {
        self.forward_with(batch, None, kv)
    }

    /// [`Self::forward`] with image features placed into the step's image rows.
    pub fn forward_with(&self, batch: &StepBatch, vision: Option<StepVision>, kv: &mut KvPool) -> Result<Tensor<2>, EngineError> {
        let c = &self.config;
        let t = batch.tokens.len();
        let queries: usize = batch.spans.iter().map(|s| s.queries).sum();
        if t == 0 || batch.positions.len() != t || batch.slots.len() != t || queries != t {
            return Err(EngineError::InvalidRequest("a step needs tokens, positions, slots and spans that agree".into()));
        }
        if let Some(&bad) = batch.tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary (size {})", c.vocab_size)));
        }
        let pool_slots = kv.blocks * kv.block_tokens;
        if let Some(&bad) = batch.slots.iter().find(|&&s| s >= pool_slots) {
            return Err(EngineError::InvalidRequest(format!("cache slot {bad} is outside the pool of {pool_slots} slots")));
        }
        if batch.spans.iter().any(|s| s.blocks.len() * kv.block_tokens < s.context || s.queries > s.context) {
            return Err(EngineError::InvalidRequest("a sequence's blocks do not cover its context".into()));
        }
        let device = &self.device;
        let ints = |values: Vec<i64>| {
            let n = values.len();
            Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device)
        };
        let (cos, sin) = match (self.spec.mrope_section, batch.mrope.is_empty()) {
            (_, true) => rope::cos_sin(&self.inv_freq, std::slice::from_ref(&batch.positions), device, burn_dtype(self.dtype)),
            (Some(section), false) if batch.mrope.len() == t => rope::mrope_cos_sin(&self.inv_freq, &batch.mrope, section, device, burn_dtype(self.dtype)),
            _ => return Err(EngineError::InvalidRequest("multimodal positions for a model without M-RoPE, or not one per token".into())),
        };
        if let Some(v) = &vision {
            let n = v.rows.dims()[0];
            if v.embeds.dims() != [n, c.hidden_size] || v.deepstack.len() > self.blocks.len() || v.deepstack.iter().any(|d| d.dims() != [n, c.hidden_size]) {
                return Err(EngineError::InvalidRequest("image features do not fit the step".into()));
            }
        }
        // A step that wants no logits (a prompt chunk before the last) still computes one row.
        let wanted = if batch.logit_rows.is_empty() { vec![t - 1] } else { batch.logit_rows.clone() };
        if let Some(&bad) = wanted.iter().find(|&&r| r >= t) {
            return Err(EngineError::InvalidRequest(format!("logits asked of row {bad} of a {t}-token step")));
        }
        let all = wanted.len() == t && wanted.iter().enumerate().all(|(i, &r)| i == r);
        let inputs = StepTensors {
            tokens: ints(batch.tokens.iter().map(|&id| id as i64).collect()),
            cos,
            sin,
            slots: ints(batch.slots.iter().map(|&s| s as i64).collect()),
            layout: PagedLayout::new(&batch.spans, kv.block_tokens, &c.distinct_windows(), device),
            logit_rows: (!all).then(|| ints(wanted.iter().map(|&r| r as i64).collect())),
            vision,
        };
        let logits = self.forward_tensors(&inputs, kv)?;
        if batch.logit_rows.is_empty() {
            return Ok(Tensor::<2>::zeros([0, c.vocab_size], (device, BurnDType::F32)));
        }
        Ok(logits)
    }

    /// [`Self::forward`] on inputs already on the device (what a recorded decode step reads):
    /// f32 logits `[rows, vocab]`. Reads nothing back to the host (mixture-of-experts layers
    /// excepted, see [`Self::step_stays_on_device`]).
    pub fn forward_tensors(&self, inputs: &StepTensors, kv: &mut KvPool) -> Result<Tensor<2>, EngineError> {
        let c = &self.config;
        let t = inputs.tokens.dims()[0];
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let scale = (d as f64).powf(-0.5);
        let (cos, sin, slots, layout) = (&inputs.cos, &inputs.sin, &inputs.slots, &inputs.layout);
        let mut x = match &self.tp {
            Some(tp) => self.rank_lookup(tp, &inputs.tokens)?,
            None => self.embed.lookup(&inputs.tokens, burn_dtype(self.dtype)),
        };
        if let Some(v) = &inputs.vision {
            x = x.select_assign(0, v.rows.clone(), v.embeds.clone(), IndexingUpdateOp::Assign);
        }
        let mut x = x.reshape([1, t, h]);
        // The last block output not yet added to the residual stream: each add runs together
        // with the normalisation after it (one kernel on the GPU).
        let mut pending: Option<Tensor<3>> = None;
        for (l, block) in self.blocks.iter().enumerate() {
            let (residual, normed) = match pending.take() {
                Some(y) => add_rms_norm(x, y, &block.input_norm, c.rms_norm_eps),
                None => (x.clone(), rms_norm(x, &block.input_norm, c.rms_norm_eps)),
            };
            let normed = normed.reshape([t, h]);
            // Heads `[q.., k.., v..]`. Queries and keys get their QK-norm and rotary
            // embedding together (one normalisation, one rotation), then split as views.
            let qkv = block.qkv.forward(normed).reshape([1, t, nh + 2 * nkv, d]);
            let (k_pool, v_pool) = kv.layers[l]
                .take()
                .ok_or_else(|| EngineError::Device(format!("KV pool layer {l} was lost by an earlier failed step")))?;
            // The keys and values go into their pages with the queries' and keys' QK-norm and
            // rotation (one kernel on the GPU).
            let (q, k_pool, v_pool) = rotate_into_pages(qkv, block.qk_norm.as_ref(), nkv, cos, sin, c.rms_norm_eps, k_pool, v_pool, slots.clone());
            let attn = paged_attention(q, &k_pool, &v_pool, layout, c.layer_windows[l], scale);
            kv.layers[l] = Some((k_pool, v_pool));
            let attn = attn.reshape([t, nh * d]);
            let attn = self.all_reduce(block.o.forward(attn))?;
            let (residual, normed) = add_rms_norm(residual, attn.reshape([1, t, h]), &block.post_norm, c.rms_norm_eps);
            let normed = normed.reshape([t, h]);
            let mlp = match &block.mlp {
                FeedForward::Dense(mlp) => mlp.forward(normed),
                FeedForward::Moe(moe) => moe.forward(normed)?,
            };
            let mlp = self.all_reduce(mlp)?;
            x = residual;
            pending = Some(mlp.reshape([1, t, h]));
            // DeepStack: this layer's image features join the image rows' hidden states.
            if let Some(v) = &inputs.vision
                && let Some(features) = v.deepstack.get(l)
            {
                let y = pending.take().map_or(x.clone(), |y| x.clone().add(y)).reshape([t, h]);
                x = y.select_assign(0, v.rows.clone(), features.clone(), IndexingUpdateOp::Add).reshape([1, t, h]);
            }
            if crate::progress::enabled() && (l < 2 || l + 1 == self.blocks.len()) {
                crate::progress::log(|| format!("layer {l} queued ({t} tokens)"));
            }
        }
        let x = match pending {
            Some(y) => x.add(y),
            None => x,
        };
        let x = match &inputs.logit_rows {
            None => x,
            Some(rows) => {
                let n = rows.dims()[0];
                x.reshape([t, h]).select(0, rows.clone()).reshape([1, n, h])
            }
        };
        self.logits(x)
    }

    /// Final norm and LM head over `x [1, rows, hidden]`: f32 logits `[rows, vocab]`.
    fn logits(&self, x: Tensor<3>) -> Result<Tensor<2>, EngineError> {
        let c = &self.config;
        let [_, rows, h] = x.dims();
        let x = rms_norm(x, &self.norm, c.rms_norm_eps).reshape([rows, h]);
        let out = self.lm_head.forward(x);
        let out = if self.dtype == DType::F32 { out } else { out.cast(BurnDType::F32) };
        match &self.tp {
            // Each rank's vocabulary rows, side by side.
            Some(tp) => tp.all_gather_columns(out),
            None => Ok(out),
        }
    }

    /// A row-parallel product's partial sums completed across the ranks (as it is alone).
    fn all_reduce(&self, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        match &self.tp {
            Some(tp) => tp.all_reduce(x),
            None => Ok(x),
        }
    }

    /// A tensor-parallel rank's embedding rows of `tokens`: its own vocabulary rows, zeros
    /// for the others' tokens, summed across the ranks.
    fn rank_lookup(&self, tp: &TpRank, tokens: &Tensor<1, Int>) -> Result<Tensor<2>, EngineError> {
        let [t] = tokens.dims();
        let vocab = &tp.shard.vocab;
        let local = tokens.clone().sub_scalar(vocab.start as i64);
        let held = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(vocab.len() as i64));
        let dtype = burn_dtype(self.dtype);
        let rows = self.embed.lookup(&local.mask_fill(held.clone().bool_not(), 0), dtype);
        let rows = rows.mul(held.float().cast(dtype).reshape([t, 1]));
        tp.all_reduce(rows)
    }

    /// Whether a one-token step of `rows` rows runs without reading anything back to the
    /// host (mixture-of-experts layers place many rows by reading their routing decisions),
    /// which recording it as a CUDA graph requires.
    pub fn step_stays_on_device(&self, rows: usize) -> bool {
        self.blocks.iter().all(|b| match &b.mlp {
            FeedForward::Dense(_) => true,
            FeedForward::Moe(moe) => moe.routes_on_device(rows),
        })
    }

    /// The rotary `cos`/`sin` of positions `0..positions`, `[positions, rotary_dim]` in the
    /// model's dtype: the values [`rope::cos_sin`] gives a step at those positions.
    pub fn rope_table(&self, positions: usize) -> (Tensor<2>, Tensor<2>) {
        let rot = self.inv_freq.len() * 2;
        let (cos, sin) = rope::cos_sin(&self.inv_freq, &[(0..positions).collect()], &self.device, burn_dtype(self.dtype));
        (cos.reshape([positions, rot]), sin.reshape([positions, rot]))
    }
}
