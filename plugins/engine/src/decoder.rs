//! The decoder-only transformer shared by every model: embeddings, N pre-norm blocks of
//! grouped-query attention (optional per-head QK-norm, optional q/k/v and o bias, rotary
//! embeddings, full or partial) and a feed-forward block — a SwiGLU MLP, or a mixture of
//! experts ([`crate::moe`]) — a final RMSNorm and the LM head (tied or not). References:
//! transformers `modeling_llama.py` / `modeling_qwen3.py` (`Qwen3Attention`, `Qwen3MLP`,
//! `Qwen3DecoderLayer`, `eager_attention_forward`), `modeling_qwen3_moe.py`,
//! `modeling_glm4_moe.py`.

use crate::error::EngineError;
use crate::hf_config::DecoderConfig;
use crate::kv_cache::KvCache;
use crate::moe::{Mlp, MoeBlock, MoeSpec, moe_tensors};
use crate::rope;
use crate::weights::{Checkpoint, burn_dtype};
use burn::tensor::{DType as BurnDType, Device, Int, Tensor, TensorData};
use inference_pio_core::types::DType;
use inference_pio_kernels::attention::{decode_attention, gqa_attention};
use inference_pio_kernels::{add_rms_norm, apply_rotary, concat_outputs, linear, qk_norm_rotary, rms_norm, split_parts, split_weight};

/// The additive attention mask of a slot a query may not see.
const MASKED: f32 = -1.0e9;

/// The inputs of [`Decoder::device_step`], kept on the device between steps (see
/// [`crate::decode_graph`], which owns and refreshes them).
pub struct DeviceStep {
    pub cache: KvCache,
    /// Allocated cache slots the step attends over (the cache's storage).
    pub slots: usize,
    /// `[batch]`: this step's token per row.
    pub tokens: Tensor<1, Int>,
    /// `[batch]`: each row's rotary position (its slot minus its padding).
    pub positions: Tensor<1, Int>,
    /// `[1]`: the cache slot this step writes.
    pub slot: Tensor<1, Int>,
    /// `[batch, 1]`: each row's left padding.
    pub pads: Tensor<2, Int>,
    /// `[1, slots]`: `0..slots`.
    pub slot_ids: Tensor<2, Int>,
    /// `[slots, rotary_dim]` from [`Decoder::rope_table`].
    pub cos_table: Tensor<2>,
    pub sin_table: Tensor<2>,
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
}

impl DecoderSpec {
    /// A dense decoder whose q/k/v/o biases all follow `attention_bias`.
    pub fn dense(config: &DecoderConfig, qk_norm: bool) -> Self {
        Self { qk_norm, o_proj_bias: config.attention_bias, moe: None }
    }

    fn is_sparse(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.sparse_layers.get(layer).copied().unwrap_or(false))
    }
}

enum FeedForward {
    Dense(Box<Mlp>),
    Moe(Box<MoeBlock>),
}

struct Linear {
    /// HF `[out, in]` layout split into column blocks, `[parts, out, in / parts]`
    /// ([`inference_pio_kernels::split_weight`]; one block on the CPU and where cuBLAS runs).
    weight: Tensor<3>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    fn load(ckpt: &Checkpoint, prefix: &str, out: usize, inp: usize, bias: bool, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let weight = ckpt.load_linear(&format!("{prefix}.weight"), [out, inp], device, dtype)?;
        let bias = if bias { Some(ckpt.load(&format!("{prefix}.bias"), [out], device, dtype)?) } else { None };
        Ok(Self { weight, bias })
    }

    /// Several projections of the same input as one (`q`, `k`, `v`): their weights
    /// concatenated along `out`, so one matrix product (one kernel) computes them all; the
    /// caller splits the output at the parts' widths.
    fn load_fused(ckpt: &Checkpoint, prefixes: &[String], outs: &[usize], inp: usize, bias: bool, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let parts = prefixes
            .iter()
            .zip(outs)
            .map(|(p, &out)| Self::load(ckpt, p, out, inp, bias, device, dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let bias = bias.then(|| Tensor::cat(parts.iter().filter_map(|l| l.bias.clone()).collect(), 0));
        Ok(Self { weight: concat_outputs(parts.into_iter().map(|l| l.weight).collect()), bias })
    }

    /// `x [rows, in] -> [rows, out]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = linear(x, &self.weight);
        match &self.bias {
            Some(b) => y.add(b.clone().unsqueeze()),
            None => y,
        }
    }
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

/// Which positions get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position of each row (generation).
    Last,
    /// Every position (scoring).
    All,
}

/// A loaded dense decoder.
pub struct Decoder {
    pub config: DecoderConfig,
    pub spec: DecoderSpec,
    pub dtype: DType,
    pub device: Device,
    embed: Tensor<2>,
    blocks: Vec<Block>,
    norm: Tensor<1>,
    /// `[parts, vocab, hidden / parts]` ([`split_weight`]): `lm_head.weight`, or a split copy
    /// of the embeddings when tied (on the CPU, one block: a view of them).
    lm_head: Tensor<3>,
    inv_freq: Vec<f32>,
}

/// Names and shapes of every tensor a decoder with this config needs.
pub fn expected_tensors(c: &DecoderConfig, spec: &DecoderSpec) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
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
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
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

impl Decoder {
    /// Checks every tensor's presence, dtype and shape, then loads them.
    pub fn load(config: DecoderConfig, spec: DecoderSpec, ckpt: &Checkpoint, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        if config.hidden_act != "silu" {
            return Err(EngineError::Unsupported(format!("hidden_act `{}` is not supported (only silu)", config.hidden_act)));
        }
        for (name, shape) in expected_tensors(&config, &spec) {
            ckpt.check(&name, &shape)?;
        }
        let c = &config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let bias = c.attention_bias;
        if let Some(moe) = &spec.moe {
            moe.validate(c.num_hidden_layers)?;
        }
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mlp = match &spec.moe {
                Some(moe) if spec.is_sparse(l) => FeedForward::Moe(Box::new(MoeBlock::load(moe, ckpt, &format!("{p}.mlp"), h, device, dtype)?)),
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
        }
        let embed = ckpt.load("model.embed_tokens.weight", [c.vocab_size, h], device, dtype)?;
        let norm = ckpt.load("model.norm.weight", [h], device, dtype)?;
        let head = if c.tie_word_embeddings { embed.clone() } else { ckpt.load("lm_head.weight", [c.vocab_size, h], device, dtype)? };
        let lm_head = split_weight(head, split_parts(h, device));
        let inv_freq = rope::inverse_frequencies(&c.rope, c.rotary_dim());
        Ok(Self { config, spec, dtype, device: device.clone(), embed, blocks, norm, lm_head, inv_freq })
    }

    /// A fresh cache for rows with these left pads.
    pub fn new_cache(&self, pads: Vec<usize>, capacity: usize) -> KvCache {
        KvCache::new(self.blocks.len(), pads, capacity)
    }

    /// Runs `tokens` (`[batch][t]`, equal lengths, left-padded rows as the cache says)
    /// after what `cache` holds; returns f32 logits `[batch, t or 1, vocab]`.
    pub fn forward(&self, tokens: &[Vec<u32>], cache: &mut KvCache, logits: Logits) -> Result<Tensor<3>, EngineError> {
        let batch = tokens.len();
        let t = tokens.first().map_or(0, Vec::len);
        if batch == 0 || t == 0 || tokens.iter().any(|r| r.len() != t) || batch != cache.batch() {
            return Err(EngineError::InvalidRequest("forward needs a non-empty rectangular batch matching the cache".into()));
        }
        let c = &self.config;
        if let Some(&bad) = tokens.iter().flatten().find(|&&id| id as usize >= c.vocab_size) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary (size {})", c.vocab_size)));
        }
        let start = cache.len();
        if start + t > cache.capacity() {
            return Err(EngineError::InvalidRequest(format!(
                "sequence of {} tokens exceeds the context of {} tokens",
                start + t,
                cache.capacity()
            )));
        }
        let h = c.hidden_size;
        let bdt = burn_dtype(self.dtype);

        let ids: Vec<i64> = tokens.iter().flatten().map(|&id| id as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [batch * t]), &self.device);
        let x = self.embed.clone().select(0, ids).reshape([batch, t, h]);

        let pads = cache.pads().to_vec();
        let positions: Vec<Vec<usize>> = pads
            .iter()
            .map(|&pad| (start..start + t).map(|slot| slot.saturating_sub(pad)).collect())
            .collect();
        let (cos, sin) = rope::cos_sin(&self.inv_freq, &positions, &self.device, bdt);
        // Attention runs over every allocated slot; those not yet written are masked.
        let total = cache.slots_for(t);
        let mask = self.attention_mask(&pads, start, t, total);
        let x = self.blocks_forward(x, &cos, &sin, mask.as_ref(), &mut |l, k, v| Ok(cache.append(l, k, v)))?;
        cache.advance(t);
        Ok(self.logits(x, logits))
    }

    /// The whole block stack over `x [batch, t, hidden]`. `store(layer, k, v)` writes this
    /// step's keys and values (`[batch, kv_heads, t, head_dim]`, after RoPE) to the cache and
    /// returns every allocated slot; `mask` (`[batch, 1, 1, t, slots]`, additive) hides the
    /// slots a query may not see.
    fn blocks_forward(
        &self,
        mut x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: Option<&Tensor<5>>,
        store: &mut dyn FnMut(usize, Tensor<4>, Tensor<4>) -> Result<(Tensor<4>, Tensor<4>), EngineError>,
    ) -> Result<Tensor<3>, EngineError> {
        let c = &self.config;
        let [batch, t, h] = x.dims();
        let d = c.head_dim;
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let scale = (d as f64).powf(-0.5);
        // The last block output not yet added to the residual stream: each add runs together
        // with the normalisation after it (one kernel on the GPU).
        let mut pending: Option<Tensor<3>> = None;
        for (l, block) in self.blocks.iter().enumerate() {
            let (residual, normed) = match pending.take() {
                Some(y) => add_rms_norm(x, y, &block.input_norm, c.rms_norm_eps),
                None => (x.clone(), rms_norm(x, &block.input_norm, c.rms_norm_eps)),
            };
            let normed = normed.reshape([batch * t, h]);
            // Heads `[q.., k.., v..]`. Queries and keys get their QK-norm and rotary
            // embedding together (one normalisation, one rotation), then split as views.
            let qkv = block.qkv.forward(normed).reshape([batch, t, nh + 2 * nkv, d]);
            let qk = qkv.clone().narrow(2, 0, nh + nkv);
            let qk = match &block.qk_norm {
                Some(w) => qk_norm_rotary(qk, w, cos, sin, c.rms_norm_eps),
                None => apply_rotary(qk.swap_dims(1, 2), cos, sin),
            };
            let q = qk.clone().narrow(1, 0, nh);
            let k = qk.narrow(1, nh, nkv);
            let v = qkv.narrow(2, nh + nkv, nkv).swap_dims(1, 2);
            let (k_all, v_all) = store(l, k, v)?;
            // One query token per row (decode) runs through our kernel on the GPU.
            let attn = decode_attention(q.clone(), &k_all, &v_all, mask, scale).unwrap_or_else(|| gqa_attention(q, &k_all, &v_all, mask, scale));
            let attn = attn.swap_dims(1, 2).reshape([batch * t, nh * d]);
            let (residual, normed) = add_rms_norm(residual, block.o.forward(attn).reshape([batch, t, h]), &block.post_norm, c.rms_norm_eps);
            let normed = normed.reshape([batch * t, h]);
            let mlp = match &block.mlp {
                FeedForward::Dense(mlp) => mlp.forward(normed),
                FeedForward::Moe(moe) => moe.forward(normed)?,
            };
            x = residual;
            pending = Some(mlp.reshape([batch, t, h]));
            if crate::progress::enabled() && (l < 2 || l + 1 == self.blocks.len()) {
                crate::progress::log(|| format!("layer {l} queued ({} x {t} tokens)", batch));
            }
        }
        Ok(match pending {
            Some(y) => x.add(y),
            None => x,
        })
    }

    /// Final norm and LM head; f32 logits `[batch, t or 1, vocab]`.
    fn logits(&self, x: Tensor<3>, logits: Logits) -> Tensor<3> {
        let c = &self.config;
        let [batch, t, h] = x.dims();
        let x = match logits {
            Logits::Last => x.narrow(1, t - 1, 1),
            Logits::All => x,
        };
        let rows = x.dims()[1];
        let x = rms_norm(x, &self.norm, c.rms_norm_eps).reshape([batch * rows, h]);
        let out = linear(x, &self.lm_head).reshape([batch, rows, c.vocab_size]);
        if self.dtype == DType::F32 { out } else { out.cast(BurnDType::F32) }
    }

    /// Whether a one-token step of `batch` rows runs without reading anything back to the
    /// host (mixture-of-experts layers place many rows by reading their routing decisions),
    /// which capturing it as a CUDA graph requires.
    pub fn step_stays_on_device(&self, batch: usize) -> bool {
        self.blocks.iter().all(|b| match &b.mlp {
            FeedForward::Dense(_) => true,
            FeedForward::Moe(moe) => moe.routes_on_device(batch),
        })
    }

    /// The rotary `cos`/`sin` of positions `0..slots`, `[slots, rotary_dim]` in the model's
    /// dtype: the same values [`rope::cos_sin`] gives a step at those positions.
    pub fn rope_table(&self, slots: usize) -> (Tensor<2>, Tensor<2>) {
        let rot = self.inv_freq.len() * 2;
        let (cos, sin) = rope::cos_sin(&self.inv_freq, &[(0..slots).collect()], &self.device, burn_dtype(self.dtype));
        (cos.reshape([slots, rot]), sin.reshape([slots, rot]))
    }

    /// One decode step whose inputs all live on the device ([`DeviceStep`]), so it can be
    /// recorded once and replayed: the token ids, each row's position and the slot written
    /// change between replays without the host touching the step. The cache must already
    /// hold `inputs.slots` allocated slots. Returns f32 logits `[batch, 1, vocab]`.
    pub fn device_step(&self, inputs: &mut DeviceStep) -> Result<Tensor<3>, EngineError> {
        let c = &self.config;
        let batch = inputs.cache.batch();
        let slots = inputs.slots;
        let rot = self.inv_freq.len() * 2;
        let x = self.embed.clone().select(0, inputs.tokens.clone()).reshape([batch, 1, c.hidden_size]);
        let cos = inputs.cos_table.clone().select(0, inputs.positions.clone()).reshape([batch, 1, 1, rot]);
        let sin = inputs.sin_table.clone().select(0, inputs.positions.clone()).reshape([batch, 1, 1, rot]);
        // Query at `slot` sees slots `pad..=slot` of its row.
        let last = inputs.slot.clone().reshape([1, 1]);
        let mask = self.additive_mask(inputs.slot_ids.clone(), inputs.pads.clone(), last, [batch, slots]).reshape([batch, 1, 1, 1, slots]);
        let (cache, slot) = (&mut inputs.cache, &inputs.slot);
        let x = self.blocks_forward(x, &cos, &sin, Some(&mask), &mut |l, k, v| {
            cache
                .write_at(l, k, v, slot)
                .ok_or_else(|| EngineError::InvalidRequest("a device-resident decode step needs a prefilled cache".into()))
        })?;
        Ok(self.logits(x, Logits::Last))
    }

    /// Additive mask `[batch, 1, 1, t, total]`: query `i` (slot `start + i`) sees slots
    /// `pad..=start + i`. `None` when nothing is masked (one new token filling the last
    /// allocated slot, no padding).
    fn attention_mask(&self, pads: &[usize], start: usize, t: usize, total: usize) -> Option<Tensor<5>> {
        if t == 1 && start + 1 == total && pads.iter().all(|&p| p == 0) {
            return None;
        }
        // Built on the device: a 2,048-token prompt's mask is 16 MB of f32 that the host would
        // otherwise fill and upload.
        let batch = pads.len();
        let shape = [batch, t, total];
        let ints = |values: Vec<i64>, dims: [usize; 3]| Tensor::<3, Int>::from_data(TensorData::new(values, dims), &self.device);
        let slot = ints((0..total as i64).collect(), [1, 1, total]);
        let last = ints((start as i64..(start + t) as i64).collect(), [1, t, 1]);
        let pad = ints(pads.iter().map(|&p| p as i64).collect(), [batch, 1, 1]);
        Some(self.additive_mask(slot, pad, last, shape).reshape([batch, 1, 1, t, total]))
    }

    /// The additive mask over `shape` (the three broadcast to it): 0 where `pad <= slot <=
    /// last`, [`MASKED`] elsewhere.
    fn additive_mask<const D: usize>(&self, slot: Tensor<D, Int>, pad: Tensor<D, Int>, last: Tensor<D, Int>, shape: [usize; D]) -> Tensor<D> {
        let slot = slot.expand(shape);
        let seen = slot.clone().greater_equal(pad.expand(shape)).bool_and(slot.lower_equal(last.expand(shape)));
        Tensor::<D>::zeros(shape, (&self.device, BurnDType::F32)).mask_fill(seen.bool_not(), MASKED)
    }
}
