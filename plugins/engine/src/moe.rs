//! Mixture-of-experts feed-forward blocks, written once for every MoE family:
//!
//! - routing ([`Router`]): softmax top-k (transformers `Qwen3MoeTopKRouter`, Mixtral), and
//!   sigmoid scoring with a score-correction bias and group-limited top-k (DeepSeek-V3,
//!   transformers `Glm4MoeTopkRouter`);
//! - the experts ([`MoeBlock`]): each expert runs only on the tokens routed to it — the rows
//!   are gathered, run through that expert's SwiGLU MLP as one matrix product per projection,
//!   weighted and scatter-added back (transformers `Qwen3MoeExperts` / `Glm4MoeExperts`) —
//!   plus optional always-on shared experts (`Glm4MoeMoE.shared_experts`).
//!
//! Routing decisions are taken on the host from the router's f32 scores (tokens x experts,
//! small), so selection is exact `torch.topk` semantics and the expert loop only visits
//! experts that received tokens. Each expert's rows are padded to a power of two (results of
//! the padding dropped) so that the matmul shapes stay few.

use crate::error::EngineError;
use crate::weights::Checkpoint;
use burn::tensor::{DType as BurnDType, Device, IndexingUpdateOp, Int, Tensor, TensorData};
use inference_pio_core::types::DType;

/// How a token's experts and their weights are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Router {
    /// Softmax over all experts, the `top_k` largest probabilities, renormalised to sum to
    /// one when `norm_topk_prob` (Qwen3-MoE, Qwen2-MoE, Mixtral).
    SoftmaxTopK { norm_topk_prob: bool },
    /// Sigmoid scores; experts are chosen on `score + e_score_correction_bias` among the best
    /// `topk_group` of `n_group` expert groups (a group's score is the sum of its two best),
    /// weighted by their uncorrected scores, renormalised when `norm_topk_prob`, then scaled
    /// by `routed_scaling_factor` (DeepSeek-V3, GLM-4.5/4.6/4.7).
    SigmoidGrouped { n_group: usize, topk_group: usize, norm_topk_prob: bool, routed_scaling_factor: f64 },
}

/// The mixture-of-experts part of a decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeSpec {
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Hidden width of each routed expert's MLP.
    pub expert_intermediate: usize,
    /// Hidden width of the shared-expert MLP every token also goes through (`None`: none).
    pub shared_intermediate: Option<usize>,
    pub router: Router,
    /// Per layer: `true` = MoE block, `false` = dense MLP of `intermediate_size`.
    pub sparse_layers: Vec<bool>,
}

impl MoeSpec {
    /// Checks the numbers fit together.
    pub fn validate(&self, layers: usize) -> Result<(), EngineError> {
        if self.num_experts == 0 || self.top_k == 0 || self.top_k > self.num_experts {
            return Err(EngineError::Config(format!(
                "num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                self.top_k, self.num_experts
            )));
        }
        if self.expert_intermediate == 0 {
            return Err(EngineError::Config("moe_intermediate_size must be positive".into()));
        }
        if self.sparse_layers.len() != layers {
            return Err(EngineError::Config(format!("{} layer kinds for {layers} layers", self.sparse_layers.len())));
        }
        if let Router::SigmoidGrouped { n_group, topk_group, .. } = self.router {
            if n_group == 0 || !self.num_experts.is_multiple_of(n_group) {
                return Err(EngineError::Config(format!("n_group ({n_group}) must divide the number of experts ({})", self.num_experts)));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(EngineError::Config(format!("topk_group ({topk_group}) must be between 1 and n_group ({n_group})")));
            }
            if self.num_experts / n_group < 2 {
                return Err(EngineError::Config("each expert group needs at least two experts (group score = top-2 sum)".into()));
            }
            if self.top_k > topk_group * (self.num_experts / n_group) {
                return Err(EngineError::Config(format!(
                    "num_experts_per_tok ({}) exceeds the experts in {topk_group} groups",
                    self.top_k
                )));
            }
        }
        Ok(())
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// One token's routing: `(expert, weight)` pairs from its router logits (`router_logits`,
/// one per expert) and, for the sigmoid router, the score-correction bias.
pub fn route(router: &Router, top: usize, router_logits: &[f32], bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    match *router {
        Router::SoftmaxTopK { norm_topk_prob } => {
            let max = router_logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = router_logits.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let probs: Vec<f32> = exp.iter().map(|e| e / sum).collect();
            let chosen = top_k(&probs, top);
            let total: f32 = chosen.iter().map(|&e| probs[e]).sum();
            chosen
                .into_iter()
                .map(|e| (e, if norm_topk_prob { probs[e] / total } else { probs[e] }))
                .collect()
        }
        Router::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor } => {
            let scores: Vec<f32> = router_logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
            let choice: Vec<f32> = match bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            let per_group = scores.len() / n_group;
            let group_scores: Vec<f32> = choice
                .chunks(per_group)
                .map(|g| top_k(g, 2).iter().map(|&i| g[i]).sum())
                .collect();
            let groups = top_k(&group_scores, topk_group);
            let masked: Vec<f32> = choice
                .iter()
                .enumerate()
                .map(|(e, &c)| if groups.contains(&(e / per_group)) { c } else { f32::NEG_INFINITY })
                .collect();
            let chosen = top_k(&masked, top);
            let total: f32 = chosen.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20;
            chosen
                .into_iter()
                .map(|e| {
                    let w = if norm_topk_prob { scores[e] / total } else { scores[e] };
                    (e, w * routed_scaling_factor as f32)
                })
                .collect()
        }
    }
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`, weights in HF `[out, in]` layout.
pub struct Mlp {
    gate: Tensor<2>,
    up: Tensor<2>,
    down: Tensor<2>,
}

impl Mlp {
    pub fn load(ckpt: &Checkpoint, prefix: &str, hidden: usize, inner: usize, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        Ok(Self {
            gate: ckpt.load(&format!("{prefix}.gate_proj.weight"), [inner, hidden], device, dtype)?,
            up: ckpt.load(&format!("{prefix}.up_proj.weight"), [inner, hidden], device, dtype)?,
            down: ckpt.load(&format!("{prefix}.down_proj.weight"), [hidden, inner], device, dtype)?,
        })
    }

    /// `x [rows, hidden] -> [rows, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gate = x.clone().matmul(self.gate.clone().transpose());
        let up = x.matmul(self.up.clone().transpose());
        inference_pio_kernels::swiglu(gate, up).matmul(self.down.clone().transpose())
    }

    /// Names and shapes of an MLP's tensors.
    pub fn tensors(prefix: &str, hidden: usize, inner: usize) -> [(String, Vec<usize>); 3] {
        [
            (format!("{prefix}.gate_proj.weight"), vec![inner, hidden]),
            (format!("{prefix}.up_proj.weight"), vec![inner, hidden]),
            (format!("{prefix}.down_proj.weight"), vec![hidden, inner]),
        ]
    }
}

/// One layer's mixture of experts.
pub struct MoeBlock {
    router: Router,
    top_k: usize,
    /// `[experts, hidden]`, always f32 (routing is decided in f32, as transformers does).
    gate: Tensor<2>,
    bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

/// Names and shapes of one MoE layer's tensors (`prefix` = `model.layers.N.mlp`).
pub fn moe_tensors(spec: &MoeSpec, prefix: &str, hidden: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![(format!("{prefix}.gate.weight"), vec![spec.num_experts, hidden])];
    if matches!(spec.router, Router::SigmoidGrouped { .. }) {
        out.push((format!("{prefix}.gate.e_score_correction_bias"), vec![spec.num_experts]));
    }
    for e in 0..spec.num_experts {
        out.extend(Mlp::tensors(&format!("{prefix}.experts.{e}"), hidden, spec.expert_intermediate));
    }
    if let Some(inner) = spec.shared_intermediate {
        out.extend(Mlp::tensors(&format!("{prefix}.shared_experts"), hidden, inner));
    }
    out
}

impl MoeBlock {
    pub fn load(spec: &MoeSpec, ckpt: &Checkpoint, prefix: &str, hidden: usize, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let gate = ckpt.load(&format!("{prefix}.gate.weight"), [spec.num_experts, hidden], device, DType::F32)?;
        let bias = match spec.router {
            Router::SigmoidGrouped { .. } => {
                let t: Tensor<1> = ckpt.load(&format!("{prefix}.gate.e_score_correction_bias"), [spec.num_experts], device, DType::F32)?;
                Some(
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .map_err(|e| EngineError::Weights(format!("{prefix}.gate.e_score_correction_bias: {e:?}")))?,
                )
            }
            Router::SoftmaxTopK { .. } => None,
        };
        let experts = (0..spec.num_experts)
            .map(|e| Mlp::load(ckpt, &format!("{prefix}.experts.{e}"), hidden, spec.expert_intermediate, device, dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = spec
            .shared_intermediate
            .map(|inner| Mlp::load(ckpt, &format!("{prefix}.shared_experts"), hidden, inner, device, dtype))
            .transpose()?;
        Ok(Self { router: spec.router.clone(), top_k: spec.top_k, gate, bias, experts, shared })
    }

    /// `x [rows, hidden] -> [rows, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        let [rows, hidden] = x.dims();
        let device = x.device();
        let dtype = x.dtype();
        let logits = x.clone().cast(BurnDType::F32).matmul(self.gate.clone().transpose());
        let logits = logits
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| EngineError::Device(format!("router logits: {e:?}")))?;
        let n_experts = self.experts.len();
        // Per expert: the rows routed to it and their weights.
        let mut assigned: Vec<(Vec<i64>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_experts];
        for (row, token_logits) in logits.chunks(n_experts).enumerate() {
            for (expert, weight) in route(&self.router, self.top_k, token_logits, self.bias.as_deref()) {
                assigned[expert].0.push(row as i64);
                assigned[expert].1.push(weight);
            }
        }
        let mut out = Tensor::<2>::zeros([rows, hidden], (&device, dtype));
        for (expert, (token_rows, weights)) in assigned.into_iter().enumerate() {
            if token_rows.is_empty() {
                continue;
            }
            let n = token_rows.len();
            // The expert runs on a power-of-two number of rows (the first row repeated, the
            // extra results dropped), so a prefill meets a handful of matmul shapes instead of
            // one per token count: every new shape costs a kernel compile and autotune on CUDA.
            let bucket = n.next_power_of_two();
            let mut gather_rows = token_rows.clone();
            gather_rows.resize(bucket, token_rows[0]);
            let gather = Tensor::<1, Int>::from_data(TensorData::new(gather_rows, [bucket]), &device);
            let h = self.experts[expert].forward(x.clone().select(0, gather));
            let h = if bucket > n { h.narrow(0, 0, n) } else { h };
            let index = Tensor::<1, Int>::from_data(TensorData::new(token_rows, [n]), &device);
            let w = Tensor::<2>::from_data(TensorData::new(weights, [n, 1]), (&device, BurnDType::F32)).cast(dtype);
            out = out.select_assign(0, index, h.mul(w), IndexingUpdateOp::Add);
        }
        Ok(match &self.shared {
            Some(shared) => out.add(shared.forward(x)),
            None => out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_router_picks_the_largest_and_renormalises() {
        let logits = [0.0, 2.0, 1.0, -1.0];
        let r = route(&Router::SoftmaxTopK { norm_topk_prob: true }, 2, &logits, None);
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        let e = std::f32::consts::E;
        assert!((r[0].1 - e / (e + 1.0)).abs() < 1e-6 && (r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
        let raw = route(&Router::SoftmaxTopK { norm_topk_prob: false }, 2, &logits, None);
        let z: f32 = logits.iter().map(|l: &f32| l.exp()).sum();
        assert!((raw[0].1 - 2f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_router_uses_the_bias_for_choice_and_groups_for_limits() {
        // Four experts in two groups. Expert 3 has the best raw score but its group loses.
        let logits = [1.0, 0.9, -3.0, 2.0];
        let router = Router::SigmoidGrouped { n_group: 2, topk_group: 1, norm_topk_prob: false, routed_scaling_factor: 2.0 };
        let r = route(&router, 2, &logits, Some(&[0.0, 0.0, 0.0, 0.0]));
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        let s = |l: f32| 1.0 / (1.0 + (-l).exp());
        assert!((r[0].1 - 2.0 * s(1.0)).abs() < 1e-6);
        // A bias moves the choice (and the group) without changing the weights' source.
        let r = route(&router, 2, &logits, Some(&[0.0, 0.0, 5.0, 0.0]));
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!((r[0].1 - 2.0 * s(-3.0)).abs() < 1e-6);
        let norm = Router::SigmoidGrouped { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1.0 };
        let r = route(&norm, 3, &logits, None);
        assert!((r.iter().map(|p| p.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
