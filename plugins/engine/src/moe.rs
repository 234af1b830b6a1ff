//! Mixture-of-experts feed-forward blocks, written once for every MoE family:
//!
//! - routing ([`Router`]): softmax top-k (transformers `Qwen3MoeTopKRouter`, Mixtral), and
//!   sigmoid scoring with a score-correction bias and group-limited top-k (DeepSeek-V3,
//!   transformers `Glm4MoeTopkRouter`);
//! - the experts ([`MoeBlock`]): each token's output is the weighted sum of its chosen
//!   experts' (transformers `Qwen3MoeExperts` / `Glm4MoeExperts`), plus optional always-on
//!   shared experts (`Glm4MoeMoE.shared_experts`). Every layer's experts are stacked into one
//!   tensor per projection, so the experts run as one batched matmul per projection, in one of
//!   three ways ([`ExpertPath`]): with few tokens over the chosen experts' weights, pair by
//!   pair; with decode-sized batches on a GPU, every expert over every row; with many
//!   (prefill) over each expert's gathered rows (gather, grouped matmul, gather back, weighted
//!   sum).
//!
//! Routing is decided on the device from the router's f32 scores, so decode takes no host
//! round trip per layer; only the many-token path reads the decisions back to place rows.

use crate::error::EngineError;
use crate::decoder::Linear;
use crate::weights::Checkpoint;
use burn::tensor::activation::sigmoid;
use burn::tensor::{DType as BurnDType, Device, Int, Tensor, TensorData};
use inference_pio_core::types::DType;
use inference_pio_kernels::{batched_linear, matvec, split_parts, split_stacked, swiglu_halves};
use rayon::prelude::*;

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

impl Router {
    /// Whether router logits are computed in f32 whatever the model's dtype (transformers'
    /// `Glm4MoeTopkRouter` casts to f32; `Qwen3MoeTopKRouter` multiplies in the model's dtype
    /// and takes the softmax in f32).
    fn logits_in_f32(&self) -> bool {
        matches!(self, Router::SigmoidGrouped { .. })
    }
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

/// One routing decision per token from the router's logits `[tokens, experts]` (f32 for a
/// grouped sigmoid router; any float dtype for a softmax one, taken in f32), taken on
/// the device (no host round trip): the chosen experts `[tokens, top_k]` and their f32
/// weights `[tokens, top_k]`. `bias` is the sigmoid router's score-correction bias `[1,
/// experts]`. Exactly tied scores may be broken differently from `torch.topk` (a group tied
/// with the last one kept is kept too).
pub fn route(router: &Router, top_k: usize, logits: Tensor<2>, bias: Option<&Tensor<2>>) -> (Tensor<2, Int>, Tensor<2>) {
    match *router {
        // One kernel on CUDA (burn's softmax, sort-based top-k and division elsewhere).
        Router::SoftmaxTopK { norm_topk_prob } => inference_pio_kernels::router::softmax_top_k(logits, top_k, norm_topk_prob),
        Router::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor } => {
            let [tokens, n_experts] = logits.dims();
            let per_group = n_experts / n_group;
            let scores = sigmoid(logits);
            let choice = match bias {
                Some(b) => scores.clone().add(b.clone()),
                None => scores.clone(),
            };
            // A group's score is the sum of its two best; groups below the `topk_group`-th
            // best are dropped.
            let group_scores = choice.clone().reshape([tokens, n_group, per_group]).topk(2, 2).sum_dim(2).reshape([tokens, n_group]);
            let last_kept = group_scores.clone().topk(topk_group, 1).min_dim(1).repeat_dim(1, n_group);
            let dropped = group_scores
                .lower(last_kept)
                .float()
                .reshape([tokens, n_group, 1])
                .repeat_dim(2, per_group)
                .reshape([tokens, n_experts])
                .greater_elem(0.5);
            let (_, experts) = choice.mask_fill(dropped, f32::NEG_INFINITY).topk_with_indices(top_k, 1);
            let weights = scores.gather(1, experts.clone());
            let weights = if norm_topk_prob { weights.clone().div(weights.sum_dim(1).add_scalar(1e-20)) } else { weights };
            (experts, weights.mul_scalar(routed_scaling_factor))
        }
    }
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`, its weights dense or quantized as the
/// checkpoint stores them ([`Checkpoint::load_linear_stored`]).
pub struct Mlp {
    /// `gate_proj` and `up_proj` concatenated along `out`, one matrix product for both.
    gate_up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(ckpt: &Checkpoint, prefix: &str, hidden: usize, inner: usize, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let gate_up = [format!("{prefix}.gate_proj"), format!("{prefix}.up_proj")];
        Ok(Self {
            gate_up: Linear::load_fused(ckpt, &gate_up, &[inner, inner], hidden, false, device, dtype)?,
            down: Linear::load(ckpt, &format!("{prefix}.down_proj"), hidden, inner, false, device, dtype)?,
        })
    }

    /// `x [rows, hidden] -> [rows, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.down.forward(self.gate_up.forward_swiglu(x))
    }

    /// [`Self::forward`] of one f32 row on the host (weights quantized in host memory: see
    /// [`Linear::host_row`]): the same products of one row, and the CPU's SwiGLU row
    /// ([`inference_pio_kernels::swiglu_row`]).
    fn host_row(&self, x: &[f32]) -> Option<Vec<f32>> {
        let gate_up = self.gate_up.host_row(x)?;
        let inner = gate_up.len() / 2;
        let (gate, up) = gate_up.split_at(inner);
        let mut h = vec![0f32; inner];
        inference_pio_kernels::swiglu_row(gate, up, &mut h);
        self.down.host_row(&h)
    }

    /// [`Self::forward`] of `n` f32 rows `x [n, hidden]` on the host: the products of `n` rows
    /// (the same as through tensors), the CPU's SwiGLU row by row.
    fn host_rows(&self, x: &[f32], n: usize) -> Option<Vec<f32>> {
        let gate_up = self.gate_up.host_rows(x, n)?;
        let inner = gate_up.len() / (2 * n.max(1));
        let mut h = vec![0f32; n * inner];
        for (o, row) in h.chunks_exact_mut(inner).zip(gate_up.chunks_exact(2 * inner)) {
            let (gate, up) = row.split_at(inner);
            inference_pio_kernels::swiglu_row(gate, up, o);
        }
        self.down.host_rows(&h, n)
    }

    fn is_host_quantized(&self) -> bool {
        self.gate_up.is_host_quantized() && self.down.is_host_quantized()
    }

    /// Whether [`Self::host_rows`] takes `n` rows.
    fn host_takes(&self, n: usize) -> bool {
        (n <= HOST_DECODE_MAX_ROWS && self.is_host_quantized()) || n <= self.gate_up.host_rows_limit().min(self.down.host_rows_limit())
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

/// The most rows a step runs every expert over on a CubeCL device ([`ExpertPath::AllExperts`]):
/// at 64 rows of Qwen3-Coder-30B the extra arithmetic (128 experts x 64 rows against 512 pairs)
/// is about 77 GFLOP a layer, below the time its 1.2 GB of experts take to read.
pub const ALL_EXPERTS_MAX_ROWS: usize = 64;

/// How a step's tokens meet stacked experts ([`StackedExperts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpertPath {
    /// Each (token, expert) pair as its own product with that expert's weights.
    Pairs,
    /// Every expert over every row, the pairs picked from the outputs on the device.
    AllExperts,
    /// Every expert over the rows routed to it, placed by the host from the routing read back.
    HostPlaced,
}

/// One layer's mixture of experts: its router, its routed experts ([`RoutedExperts`]) and
/// its shared experts.
pub struct MoeBlock {
    router: Router,
    top_k: usize,
    /// The routed experts held (`routed`): all of them, or a tensor-parallel rank's range of
    /// the `router_experts` the router chooses among.
    experts: std::ops::Range<usize>,
    router_experts: usize,
    /// `[experts, hidden]`, f32 or the model's dtype ([`Router::logits_in_f32`]); routing
    /// itself is decided in f32.
    gate: Tensor<2>,
    /// `[1, experts]`, f32.
    bias: Option<Tensor<2>>,
    routed: RoutedExperts,
    shared: Option<Mlp>,
}

/// How a block holds its routed experts (the held ones, in order; one per layer: the
/// variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum RoutedExperts {
    Stacked(StackedExperts),
    /// Quantized (at load, `quantization = "int8" | "int4" | "fp8"`, or as the checkpoint's FP8
    /// or GPTQ/AWQ codes), one MLP each, run expert by expert over the rows routed to it
    /// ([`by_quantized_experts`]).
    Quantized(Vec<Mlp>),
}

/// Experts' weights stacked per layer, HF `[out, in]` layout inside, split into column
/// blocks ([`split_stacked`]): `gate_up [experts, parts, 2 * inner, hidden / parts]` (each
/// expert's gate rows, then its up rows) and `down [experts, parts, hidden, inner / parts]`;
/// they run as one batched product per projection, along an [`ExpertPath`].
struct StackedExperts {
    gate_up: Tensor<4>,
    down: Tensor<4>,
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
        Self::load_experts(spec, ckpt, prefix, hidden, device, dtype, 0..spec.num_experts)
    }

    /// [`Self::load`] holding only the routed experts `experts` (a tensor-parallel rank's);
    /// the router still chooses among all of them, and pairs whose expert is elsewhere weigh
    /// zero here.
    pub fn load_experts(spec: &MoeSpec, ckpt: &Checkpoint, prefix: &str, hidden: usize, device: &Device, dtype: DType, experts: std::ops::Range<usize>) -> Result<Self, EngineError> {
        let (n, inner) = (spec.num_experts, spec.expert_intermediate);
        if experts.is_empty() || experts.end > n {
            return Err(EngineError::Config(format!("experts {experts:?} of {n}")));
        }
        let gate_dtype = if spec.router.logits_in_f32() { DType::F32 } else { dtype };
        let gate = ckpt.load(&format!("{prefix}.gate.weight"), [n, hidden], device, gate_dtype)?;
        let bias = match spec.router {
            Router::SigmoidGrouped { .. } => {
                let b: Tensor<1> = ckpt.load(&format!("{prefix}.gate.e_score_correction_bias"), [n], device, DType::F32)?;
                Some(b.reshape([1, n]))
            }
            Router::SoftmaxTopK { .. } => None,
        };
        let shared = spec
            .shared_intermediate
            .map(|inner| Mlp::load(ckpt, &format!("{prefix}.shared_experts"), hidden, inner, device, dtype))
            .transpose()?;
        let first_expert = format!("{prefix}.experts.{}.gate_proj.weight", experts.start);
        let routed = if ckpt.quantizes_at_load() || ckpt.keeps_stored_codes(&first_expert) {
            // Each expert's products quantized like the other linear weights (made at load, or
            // the checkpoint's FP8 or GPTQ/AWQ codes kept).
            let mlps = experts.clone().map(|e| Mlp::load(ckpt, &format!("{prefix}.experts.{e}"), hidden, inner, device, dtype)).collect::<Result<Vec<_>, _>>()?;
            RoutedExperts::Quantized(mlps)
        } else {
            let expert = |e: usize, proj: &str| format!("{prefix}.experts.{e}.{proj}.weight");
            let gate_up_names: Vec<String> = (0..n).flat_map(|e| [expert(e, "gate_proj"), expert(e, "up_proj")]).collect();
            let held = experts.len();
            let gate_up = ckpt
                .load_stacked_part(&gate_up_names, 2 * experts.start..2 * experts.end, [inner, hidden], device, dtype)?
                .reshape([held, 2 * inner, hidden]);
            let gate_up = split_stacked(gate_up, split_parts(hidden, device));
            let down_names: Vec<String> = (0..n).map(|e| expert(e, "down_proj")).collect();
            let down = split_stacked(ckpt.load_stacked_part(&down_names, experts.clone(), [hidden, inner], device, dtype)?, split_parts(inner, device));
            RoutedExperts::Stacked(StackedExperts { gate_up, down })
        };
        Ok(Self { router: spec.router.clone(), top_k: spec.top_k, experts, router_experts: n, gate, bias, routed, shared })
    }

    /// Whether `rows` tokens run without reading their routing decisions back to the host
    /// (which recording a decode step as a CUDA graph requires).
    pub fn routes_on_device(&self, rows: usize) -> bool {
        match &self.routed {
            RoutedExperts::Stacked(s) => s.path(rows, self.top_k) != ExpertPath::HostPlaced,
            RoutedExperts::Quantized(_) => false,
        }
    }

    /// `x [rows, hidden] -> [rows, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        let [rows, hidden] = x.dims();
        let k = self.top_k;
        // As a linear of one part (`[1, experts, hidden]`, a view): a decode step's few rows
        // go through the matrix-vector kernel and more through cuBLAS on CUDA. Burn's
        // `matmul` against the transposed gate took 105 µs a layer for one row on an H100,
        // a third of the 12-layer Qwen3-Coder-30B-A3B's batch-1 step (ncu, 2026-12-06).
        let gate = self.gate.clone().unsqueeze_dim::<3>(0);
        // In the model's dtype for a softmax router (its kernel reads them as f32; transformers
        // takes the softmax in f32 of the bf16 logits), in f32 throughout for GLM's.
        let logits = if self.router.logits_in_f32() {
            inference_pio_kernels::linear(x.clone().cast(BurnDType::F32), &gate)
        } else {
            inference_pio_kernels::linear(x.clone(), &gate)
        };
        let (experts, weights) = route(&self.router, k, logits, self.bias.as_ref());
        // A rank holding some of the experts: the others' pairs go to its first expert with
        // weight zero.
        let (experts, weights) = if self.experts.len() == self.router_experts {
            (experts, weights)
        } else {
            let local = experts.sub_scalar(self.experts.start as i64);
            let held = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(self.experts.len() as i64));
            (local.mask_fill(held.clone().bool_not(), 0), weights.mul(held.float()))
        };
        if let RoutedExperts::Quantized(mlps) = &self.routed
            && x.dtype() == BurnDType::F32
            && mlps.iter().all(|m| m.host_takes(rows))
        {
            // A shared expert quantized in host memory joins on the host too (added after the
            // routed experts' sum, as below).
            let shared = self.shared.as_ref().filter(|m| m.host_takes(rows));
            let out = by_quantized_experts_on_host(mlps, shared, &x, experts, weights, k)?;
            return Ok(match &self.shared {
                Some(other) if shared.is_none() => out.add(other.forward(x)),
                _ => out,
            });
        }
        let per_slot = match &self.routed {
            RoutedExperts::Stacked(s) => match s.path(rows, k) {
                ExpertPath::Pairs => s.by_gathered_weights(x.clone(), experts, k),
                ExpertPath::AllExperts => s.by_all_experts(x.clone(), experts, k),
                ExpertPath::HostPlaced => s.by_expert_batches(x.clone(), experts, k)?,
            },
            RoutedExperts::Quantized(mlps) => by_quantized_experts(mlps, x.clone(), experts, k)?,
        };
        // Weighted and summed in one kernel on CUDA.
        let out = inference_pio_kernels::router::combine(per_slot.reshape([rows * k, hidden]), weights);
        Ok(match &self.shared {
            Some(shared) => out.add(shared.forward(x)),
            None => out,
        })
    }
}

impl StackedExperts {
    fn num_experts(&self) -> usize {
        self.gate_up.dims()[0]
    }

    /// How `rows` tokens of `top_k` experts each meet the experts ([`ExpertPath`]).
    ///
    /// - Where our kernel reads the chosen experts in place ([`matvec::gathered_kernel_applies`]),
    ///   the (token, expert) pairs read at most every expert's bytes while they are no more
    ///   than the experts, so they take [`ExpertPath::Pairs`] up to that count (Qwen3-Coder-30B:
    ///   8 rows of 8 experts out of 128). With a third of it (the earlier bound, 5 rows) batch 8
    ///   decoded slower than batch 1, on host-placed batches (261 against 326 tok/s, 12-layer
    ///   30B, H100, 2026-12-06). Elsewhere the pairs' weights are copied (read, written, read
    ///   again), so a third of the experts is the bound.
    /// - Past it, decode-sized batches on a CubeCL device run every expert over every row
    ///   ([`ExpertPath::AllExperts`], up to [`ALL_EXPERTS_MAX_ROWS`] rows): each expert is
    ///   read once, as on the host-placed path, without its round trip per layer.
    /// - The rest (prefill chunks, and anything on the CPU) is placed by the host.
    fn path(&self, rows: usize, top_k: usize) -> ExpertPath {
        let pairs = rows * top_k;
        let device = self.gate_up.device();
        let pairs_fit = if matvec::gathered_kernel_applies(pairs, &device) { pairs <= self.num_experts() } else { 3 * pairs <= self.num_experts() };
        if pairs_fit {
            ExpertPath::Pairs
        } else if device != Device::flex() && rows <= ALL_EXPERTS_MAX_ROWS {
            ExpertPath::AllExperts
        } else {
            ExpertPath::HostPlaced
        }
    }

    /// Each (token, expert) pair as one batch entry with that expert's weights gathered:
    /// `[rows * top_k, hidden]`, token-major. No host round trip.
    fn by_gathered_weights(&self, x: Tensor<2>, experts: Tensor<2, Int>, top_k: usize) -> Tensor<2> {
        let [rows, hidden] = x.dims();
        let slots = rows * top_k;
        let experts = experts.reshape([slots]);
        if x.dtype() == self.gate_up.dtype() && matvec::gathered_kernel_applies(slots, &x.device()) {
            // Our kernel reads the chosen experts' weights in place (no gathered copy).
            let gate_up = matvec::gathered_split_matvec(x, &self.gate_up, experts.clone());
            let act = swiglu_halves(gate_up);
            return matvec::gathered_split_matvec(act, &self.down, experts);
        }
        let x = x.reshape([rows, 1, hidden]).repeat_dim(1, top_k).reshape([slots, 1, hidden]);
        let gate_up = self.gate_up.clone().select(0, experts.clone());
        let act = swiglu_halves(batched_linear(x, gate_up));
        let down = self.down.clone().select(0, experts);
        batched_linear(act, down).reshape([slots, hidden])
    }

    /// Every expert over every row, one batched product per projection (`[experts, rows,
    /// hidden]`), then each (token, expert) pair's row taken from its expert's output on the
    /// device: `[rows * top_k, hidden]`, token-major. It computes `experts / top_k` times the
    /// pairs' arithmetic, which decode-sized batches can spare: their products are bound by
    /// reading the weights, and every expert is read once, as on the host-placed path.
    fn by_all_experts(&self, x: Tensor<2>, experts: Tensor<2, Int>, k: usize) -> Tensor<2> {
        let [rows, hidden] = x.dims();
        let n = self.num_experts();
        let xs = x.reshape([1, rows, hidden]).repeat_dim(0, n);
        let act = swiglu_halves(batched_linear(xs, self.gate_up.clone()));
        let out = batched_linear(act, self.down.clone());
        // Pair (r, j) is `out[experts[r, j], r]`: gathered along the expert axis.
        let index = experts.swap_dims(0, 1).reshape([k, rows, 1]).repeat_dim(2, hidden);
        out.gather(0, index).swap_dims(0, 1).reshape([rows * k, hidden])
    }

    /// Every expert over its routed rows: rows are gathered into `[experts, capacity, hidden]`
    /// per run of neighbouring experts ([`expert_runs`]: capacity = the run's busiest count
    /// rounded up to a power of two, so a prefill meets few matmul shapes, and no run pads
    /// past twice the step's pairs), run as one batched matmul per projection, and read back
    /// per (token, expert) pair: `[rows * top_k, hidden]`, token-major. The placement is
    /// computed on the host from the routing decisions (one small read).
    fn by_expert_batches(&self, x: Tensor<2>, experts: Tensor<2, Int>, k: usize) -> Result<Tensor<2>, EngineError> {
        let [rows, hidden] = x.dims();
        let n = self.num_experts();
        let device = x.device();
        let (chosen, counts) = read_routing(experts, rows * k, n)?;
        let runs = expert_runs(&counts, padding_budget(rows * k));
        // Where each expert's rows start in the runs' outputs, laid end to end.
        let mut first_row = vec![0usize; n];
        let mut gathers = Vec::with_capacity(runs.len());
        let mut offset = 0;
        for run in &runs {
            for (i, e) in (run.first..run.first + run.experts).enumerate() {
                first_row[e] = offset + i * run.capacity;
            }
            gathers.push(vec![0i64; run.experts * run.capacity]);
            offset += run.experts * run.capacity;
        }
        let mut combine = Vec::with_capacity(rows * k);
        let mut filled = vec![0usize; n];
        let run_of: Vec<usize> = runs.iter().enumerate().flat_map(|(r, run)| std::iter::repeat_n(r, run.experts)).collect();
        for (slot, &e) in chosen.iter().enumerate() {
            let (run, at) = (&runs[run_of[e]], first_row[e] + filled[e]);
            gathers[run_of[e]][(e - run.first) * run.capacity + filled[e]] = (slot / k) as i64;
            filled[e] += 1;
            combine.push(at as i64);
        }
        let outs: Vec<Tensor<2>> = runs
            .iter()
            .zip(gathers)
            .map(|(run, gather)| {
                let len = gather.len();
                let gather = Tensor::<1, Int>::from_data(TensorData::new(gather, [len]), &device);
                let xs = x.clone().select(0, gather).reshape([run.experts, run.capacity, hidden]);
                let act = swiglu_halves(batched_linear(xs, self.gate_up.clone().narrow(0, run.first, run.experts)));
                batched_linear(act, self.down.clone().narrow(0, run.first, run.experts)).reshape([len, hidden])
            })
            .collect();
        let out = cat_rows(outs);
        let combine = Tensor::<1, Int>::from_data(TensorData::new(combine, [rows * k]), &device);
        Ok(out.select(0, combine))
    }
}

/// Each quantized expert of `mlps` over the rows routed to it (its own products, reading its
/// codes), the rows gathered and the outputs read back per (token, expert) pair:
/// `[rows * top_k, hidden]`, token-major. The placement is computed on the host.
fn by_quantized_experts(mlps: &[Mlp], x: Tensor<2>, experts: Tensor<2, Int>, k: usize) -> Result<Tensor<2>, EngineError> {
    let [rows, hidden] = x.dims();
    let n = mlps.len();
    let device = x.device();
    let (chosen, counts) = read_routing(experts, rows * k, n)?;
    // Each expert's rows, laid end to end in expert order.
    let mut first = vec![0usize; n];
    for e in 1..n {
        first[e] = first[e - 1] + counts[e - 1];
    }
    let mut tokens = vec![0i64; rows * k];
    let mut filled = vec![0usize; n];
    let combine: Vec<i64> = chosen
        .iter()
        .enumerate()
        .map(|(slot, &e)| {
            let at = first[e] + filled[e];
            filled[e] += 1;
            tokens[at] = (slot / k) as i64;
            at as i64
        })
        .collect();
    let outs: Vec<Tensor<2>> = (0..n)
        .filter(|&e| counts[e] > 0)
        .map(|e| {
            let ids = Tensor::<1, Int>::from_data(TensorData::new(tokens[first[e]..first[e] + counts[e]].to_vec(), [counts[e]]), &device);
            mlps[e].forward(x.clone().select(0, ids))
        })
        .collect();
    let out = cat_rows(outs);
    debug_assert_eq!(out.dims(), [rows * k, hidden]);
    let combine = Tensor::<1, Int>::from_data(TensorData::new(combine, [rows * k]), &device);
    Ok(out.select(0, combine))
}

/// Up to this many rows (a decode step's) of quantized experts in host memory run as one task
/// per (row, expert) pair ([`by_quantized_experts_on_host`]); more (prompts) as one task per
/// expert over all its rows.
const HOST_DECODE_MAX_ROWS: usize = 4;

/// Rows through quantized experts kept in host memory (the CPU), on host vectors: each (row,
/// chosen expert) pair's MLP output, weighted and summed in slot order as
/// [`inference_pio_kernels::router::combine`] does, then the `shared` expert's output added
/// (weight 1).
/// - A decode step's few rows ([`HOST_DECODE_MAX_ROWS`]): one task per pair ([`Mlp::host_row`]:
///   the products of one row, as an expert with one routed row takes them). Through tensors each
///   expert took a gather, two conversions to and from host rows per product, a SwiGLU and a
///   concatenation: about 30 operations a layer.
/// - Prompts: one task per expert over the rows routed to it, gathered in slot order
///   ([`Mlp::host_rows`]: the same products as through tensors). Through tensors a 128-token
///   chunk of a 32-expert layer took about 200 operations (gathers, conversions, a
///   concatenation, the combination's product and sum) and a parallel region per product
///   (`benches/results/cpu-2026-12-07p-moe-host-prompts.md`).
fn by_quantized_experts_on_host(mlps: &[Mlp], shared: Option<&Mlp>, x: &Tensor<2>, experts: Tensor<2, Int>, weights: Tensor<2>, k: usize) -> Result<Tensor<2>, EngineError> {
    let [rows, hidden] = x.dims();
    let n = mlps.len();
    let (chosen, _) = read_routing(experts, rows * k, n)?;
    let read = |t: Tensor<2>, what: &str| -> Result<Vec<f32>, EngineError> {
        t.cast(BurnDType::F32).into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| EngineError::Device(format!("{what}: {e:?}")))
    };
    let xs = read(x.clone(), "expert inputs")?;
    let ws = read(weights, "routing weights")?;
    // Each task's output rows, and where each slot's output row lies, and each row's shared
    // expert output where there is one: (task, row of that task's output).
    let (outs, slot_at, shared_at) = if rows <= HOST_DECODE_MAX_ROWS {
        // Every (row, expert) MLP of the step at once over rayon's threads (one parallel region a
        // layer instead of two per expert); tasks row by row, so the shared ones come in row order.
        let tasks: Vec<(usize, Option<usize>)> = (0..rows).flat_map(|r| (0..k).map(move |j| (r, Some(r * k + j))).chain(shared.map(|_| (r, None)))).collect();
        let outs: Vec<Option<Vec<f32>>> = tasks
            .par_iter()
            .map(|&(r, slot)| {
                let row = &xs[r * hidden..(r + 1) * hidden];
                match slot {
                    Some(slot) => mlps[chosen[slot]].host_row(row),
                    None => shared.and_then(|m| m.host_row(row)),
                }
            })
            .collect();
        let mut slot_at = vec![(0, 0); rows * k];
        let mut shared_at: Vec<(usize, usize)> = Vec::new();
        for (t, &(_, slot)) in tasks.iter().enumerate() {
            match slot {
                Some(slot) => slot_at[slot] = (t, 0),
                None => shared_at.push((t, 0)),
            }
        }
        (outs, slot_at, shared_at)
    } else {
        // Each expert's slots in slot order; one task per expert with any (and the shared one,
        // last).
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (slot, &e) in chosen.iter().enumerate() {
            members[e].push(slot);
        }
        let tasks: Vec<Option<usize>> = (0..n).filter(|&e| !members[e].is_empty()).map(Some).chain(shared.map(|_| None)).collect();
        let outs: Vec<Option<Vec<f32>>> = tasks
            .par_iter()
            .map(|&task| match task {
                Some(e) => {
                    let slots = &members[e];
                    let mut gathered = Vec::with_capacity(slots.len() * hidden);
                    for &slot in slots {
                        let r = slot / k;
                        gathered.extend_from_slice(&xs[r * hidden..(r + 1) * hidden]);
                    }
                    mlps[e].host_rows(&gathered, slots.len())
                }
                None => shared.and_then(|m| m.host_rows(&xs, rows)),
            })
            .collect();
        let mut slot_at = vec![(0, 0); rows * k];
        for (t, &task) in tasks.iter().enumerate() {
            if let Some(e) = task {
                for (i, &slot) in members[e].iter().enumerate() {
                    slot_at[slot] = (t, i);
                }
            }
        }
        let shared_at = if shared.is_some() { (0..rows).map(|r| (tasks.len() - 1, r)).collect() } else { Vec::new() };
        (outs, slot_at, shared_at)
    };
    let outs: Vec<Vec<f32>> = outs.into_iter().collect::<Option<_>>().ok_or_else(|| EngineError::Device("a quantized expert left host memory".into()))?;
    let row_at = |(t, i): (usize, usize)| &outs[t][i * hidden..(i + 1) * hidden];
    let mut out = vec![0f32; rows * hidden];
    for (r, o) in out.chunks_exact_mut(hidden).enumerate() {
        for slot in r * k..(r + 1) * k {
            let w = ws[slot];
            for (a, v) in o.iter_mut().zip(row_at(slot_at[slot])) {
                *a += v * w;
            }
        }
        // The shared expert's weight 1 multiplies exactly.
        if let Some(&at) = shared_at.get(r) {
            for (a, v) in o.iter_mut().zip(row_at(at)) {
                *a += v;
            }
        }
    }
    Ok(Tensor::from_data(TensorData::new(out, [rows, hidden]), &x.device()))
}

/// `parts` one after another along rows (the one part itself, uncopied, when there is one).
fn cat_rows(mut parts: Vec<Tensor<2>>) -> Tensor<2> {
    if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(parts, 0) }
}

/// Bytes a step of `tokens` tokens holds at most for its host-placed expert runs (dtype of
/// `dtype_bytes` a value): one run's gathered inputs, gate/up products, SwiGLU and outputs
/// (`hidden + 2 * inner + inner + hidden` a padded row, [`padding_budget`] rows), and every
/// run's outputs twice (kept, then concatenated) at the same bound.
pub fn expert_batch_bytes(spec: &MoeSpec, hidden: usize, tokens: usize, dtype_bytes: u64) -> u64 {
    let budget = padding_budget(tokens * spec.top_k) as u64;
    let (h, i) = (hidden as u64, spec.expert_intermediate as u64);
    budget * (2 * h + 3 * i) * dtype_bytes + 2 * budget * h * dtype_bytes
}

/// Bytes one layer's [`ExpertPath::AllExperts`] products of `rows` rows hold: every expert's
/// copy of the rows, gate/up products, SwiGLU and outputs.
pub fn all_experts_bytes(spec: &MoeSpec, hidden: usize, rows: usize, dtype_bytes: u64) -> u64 {
    let (h, i) = (hidden as u64, spec.expert_intermediate as u64);
    (spec.num_experts * rows) as u64 * (2 * h + 3 * i) * dtype_bytes
}

/// The routing decisions `[rows, top_k]` read back to the host (`pairs` of them, each below
/// `n`), and how many pairs each expert got.
fn read_routing(experts: Tensor<2, Int>, pairs: usize, n: usize) -> Result<(Vec<usize>, Vec<usize>), EngineError> {
    let chosen = experts
        .reshape([pairs])
        .try_into_data()
        .map_err(|e| EngineError::Device(format!("routing decisions: {e:?}")))?
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| EngineError::Device(format!("routing decisions: {e:?}")))?;
    let mut counts = vec![0usize; n];
    let chosen = chosen
        .into_iter()
        .map(|e| {
            let slot = usize::try_from(e).ok().filter(|&e| e < n).ok_or_else(|| EngineError::Device(format!("router chose expert {e} of {n}")))?;
            counts[slot] += 1;
            Ok(slot)
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Ok((chosen, counts))
}

/// Experts `first .. first + experts` batched together, each padded to `capacity` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ExpertRun {
    first: usize,
    experts: usize,
    capacity: usize,
}

/// The most padded rows one run of host-placed experts holds for `pairs` (token, expert)
/// pairs: twice the pairs (rounded up to a power of two), which evenly routed tokens fill in
/// one run. A router that sends most tokens to one expert would otherwise pad every expert
/// to that one's count: on the 12-layer Qwen3-Coder-30B with random weights, a 2,048-token
/// chunk padded 128 experts to 2,048 rows (1 GB of inputs alone, and as much again per
/// projection), which ran the H100 out of memory beside a KV cache of 0.9 of it (2026-12-06).
fn padding_budget(pairs: usize) -> usize {
    (2 * pairs).max(1).next_power_of_two()
}

/// Neighbouring experts grouped into runs (the stacked weights of a run are a view), each
/// padded to its busiest member's count rounded up to a power of two, a run growing while
/// its padded rows stay within `budget` (an expert whose own count is past it runs alone).
fn expert_runs(counts: &[usize], budget: usize) -> Vec<ExpertRun> {
    let mut runs: Vec<ExpertRun> = Vec::new();
    for (e, &count) in counts.iter().enumerate() {
        let own = count.max(1).next_power_of_two();
        match runs.last_mut() {
            Some(run) if (run.experts + 1) * run.capacity.max(own) <= budget => {
                run.experts += 1;
                run.capacity = run.capacity.max(own);
            }
            _ => runs.push(ExpertRun { first: e, experts: 1, capacity: own }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    // The host reference the device routing is checked against (transformers' semantics).
    /// Indices of the `k` largest values, largest first (ties: lower index first).
    fn top_k(values: &[f32], k: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        order.truncate(k);
        order
    }

    /// One token's routing: `(expert, weight)` pairs from its router logits (`router_logits`,
    /// one per expert) and, for the sigmoid router, the score-correction bias.
    fn route_reference(router: &Router, top: usize, router_logits: &[f32], bias: Option<&[f32]>) -> Vec<(usize, f32)> {
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

    /// The device routing of each row of `logits` (`experts` per row) on the CPU backend,
    /// as `(expert, weight)` pairs sorted by expert.
    fn route_on_device(router: &Router, top: usize, logits: &[f32], experts: usize, bias: Option<&[f32]>) -> Vec<Vec<(usize, f32)>> {
        let device = Device::flex();
        let rows = logits.len() / experts;
        let logits = Tensor::<2>::from_data(TensorData::new(logits.to_vec(), [rows, experts]), (&device, BurnDType::F32));
        let bias = bias.map(|b| Tensor::<2>::from_data(TensorData::new(b.to_vec(), [1, experts]), (&device, BurnDType::F32)));
        let (chosen, weights) = route(router, top, logits, bias.as_ref());
        let chosen = chosen.into_data().convert::<i64>().try_into_vec::<i64>().expect("experts");
        let weights = weights.into_data().convert::<f32>().try_into_vec::<f32>().expect("weights");
        chosen
            .chunks(top)
            .zip(weights.chunks(top))
            .map(|(e, w)| {
                let mut pairs: Vec<(usize, f32)> = e.iter().map(|&e| e as usize).zip(w.iter().copied()).collect();
                pairs.sort_by_key(|p| p.0);
                pairs
            })
            .collect()
    }

    /// Device routing equals the reference on every row: same experts, weights within 1e-6.
    fn assert_same_routing(router: &Router, top: usize, logits: &[f32], experts: usize, bias: Option<&[f32]>) {
        let device = route_on_device(router, top, logits, experts, bias);
        for (row, (got, token_logits)) in device.iter().zip(logits.chunks(experts)).enumerate() {
            let mut want = route_reference(router, top, token_logits, bias);
            want.sort_by_key(|p| p.0);
            let same = got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.0 == w.0 && (g.1 - w.1).abs() < 1e-6);
            assert!(same, "row {row}: device {got:?}, reference {want:?}");
        }
    }

    /// A block of `n` random experts (top `k`) over `hidden` inputs on the CPU.
    /// A fixed LCG's values in `[0, 1)`, from `seed`.
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn random_block(n: usize, k: usize, hidden: usize, inner: usize, seed: u64) -> MoeBlock {
        let device = Device::flex();
        let mut uniform = uniform(seed);
        let mut next = move || uniform() - 0.5;
        let mut t = |shape: Vec<usize>| {
            let len = shape.iter().product();
            TensorData::new((0..len).map(|_| next()).collect::<Vec<f32>>(), shape)
        };
        let gate = Tensor::<2>::from_data(t(vec![n, hidden]), &device);
        let gate_up = split_stacked(Tensor::<3>::from_data(t(vec![n, 2 * inner, hidden]), &device), split_parts(hidden, &device));
        let down = split_stacked(Tensor::<3>::from_data(t(vec![n, hidden, inner]), &device), split_parts(inner, &device));
        let routed = RoutedExperts::Stacked(StackedExperts { gate_up, down });
        MoeBlock { router: Router::SoftmaxTopK { norm_topk_prob: true }, top_k: k, experts: 0..n, router_experts: n, gate, bias: None, routed, shared: None }
    }

    fn stacked(block: &MoeBlock) -> &StackedExperts {
        match &block.routed {
            RoutedExperts::Stacked(s) => s,
            RoutedExperts::Quantized(_) => panic!("a block of quantized experts"),
        }
    }

    /// Every path's output for each (token, expert) pair of `chosen` (`rows x k`, token-major)
    /// against that expert's MLP on the token's row alone.
    fn check_every_path(n: usize, k: usize, hidden: usize, inner: usize, rows: usize, chosen: Vec<i64>) {
        let block = random_block(n, k, hidden, inner, 7);
        let device = Device::flex();
        let x: Vec<f32> = (0..rows * hidden).map(|i| ((i * 37 % 23) as f32 - 11.0) / 13.0).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [rows, hidden]), &device);
        let experts = Tensor::<2, Int>::from_data(TensorData::new(chosen.clone(), [rows, k]), &device);
        let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values");
        let s = stacked(&block);
        let pairs = values(s.by_gathered_weights(x.clone(), experts.clone(), k));
        let all = values(s.by_all_experts(x.clone(), experts.clone(), k));
        let placed = values(s.by_expert_batches(x.clone(), experts.clone(), k).expect("host-placed experts"));
        // The quantized experts' path, here with each expert as a dense MLP of the same weights.
        let mut per_expert = random_block(n, k, hidden, inner, 7);
        per_expert.routed = RoutedExperts::Quantized(
            (0..n)
                .map(|e| Mlp {
                    gate_up: Linear::from_parts(s.gate_up.clone().narrow(0, e, 1).reshape([2 * inner, hidden]), None, &device),
                    down: Linear::from_parts(s.down.clone().narrow(0, e, 1).reshape([hidden, inner]), None, &device),
                })
                .collect(),
        );
        assert!(!per_expert.routes_on_device(1));
        let RoutedExperts::Quantized(mlps) = &per_expert.routed else { unreachable!("set above") };
        let per_expert = values(by_quantized_experts(mlps, x.clone(), experts, k).expect("per-expert products"));
        let xs = values(x);
        for (p, &e) in chosen.iter().enumerate() {
            let (r, e) = (p / k, e as usize);
            let row = Tensor::<2>::from_data(TensorData::new(xs[r * hidden..(r + 1) * hidden].to_vec(), [1, hidden]), &device);
            let gu = s.gate_up.clone().narrow(0, e, 1).reshape([1, 2 * inner, hidden]).squeeze_dim::<2>(0);
            let dn = s.down.clone().narrow(0, e, 1).reshape([1, hidden, inner]).squeeze_dim::<2>(0);
            let want = values(swiglu_halves(row.matmul(gu.transpose())).matmul(dn.transpose()));
            for (name, got) in [("pairs", &pairs), ("all experts", &all), ("host-placed", &placed), ("per expert", &per_expert)] {
                for (i, (g, w)) in got[p * hidden..(p + 1) * hidden].iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name}: pair {p} (row {r}, expert {e}) element {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn rows_of_host_quantized_experts_equal_the_batched_path() {
        use inference_pio_kernels::quant::{QuantizedLinear, QuantizedMatrix};
        let (n, k, hidden, inner) = (6, 2, 64, 32);
        let device = Device::flex();
        let mut next = uniform(3);
        let mut matrix = |rows: usize, cols: usize| -> Linear {
            let values: Vec<f32> = (0..rows * cols).map(|_| (next() - 0.5) * 0.2).collect();
            let m = QuantizedMatrix::quantize_int4(&values, rows, cols, 32).expect("int4");
            Linear::from_quantized(QuantizedLinear::new(m, &device))
        };
        let mlps: Vec<Mlp> = (0..n).map(|_| Mlp { gate_up: matrix(2 * inner, hidden), down: matrix(hidden, inner) }).collect();
        assert!(mlps.iter().all(Mlp::is_host_quantized));
        // Decode rows (a task per pair) and prompt rows (a task per expert; 17 take the tiles).
        for rows in (1..=HOST_DECODE_MAX_ROWS).chain([5, 9, 17]) {
            let x: Vec<f32> = (0..rows * hidden).map(|i| ((i * 37 % 23) as f32 - 11.0) / 13.0).collect();
            let x = Tensor::<2>::from_data(TensorData::new(x, [rows, hidden]), &device);
            // Rows sharing an expert and rows alone on theirs.
            let chosen: Vec<i64> = (0..rows * k).map(|p| ((p / k) * 2 + (p % k) * 3) as i64 % n as i64).collect();
            let experts = Tensor::<2, Int>::from_data(TensorData::new(chosen, [rows, k]), &device);
            let weights: Vec<f32> = (0..rows * k).map(|p| 0.25 + p as f32 * 0.1).collect();
            let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, k]), &device);
            let batched = by_quantized_experts(&mlps, x.clone(), experts.clone(), k).expect("batched");
            let want = inference_pio_kernels::router::combine(batched, weights.clone()).into_data().try_to_vec::<f32>().expect("f32");
            let got = by_quantized_experts_on_host(&mlps, None, &x, experts.clone(), weights.clone(), k).expect("host").into_data().try_to_vec::<f32>().expect("f32");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{rows} rows, element {i}: {g} vs {w}");
            }
            // With a shared expert (the first), added after the routed sum.
            let shared = &mlps[0];
            let with_shared = inference_pio_kernels::router::combine(by_quantized_experts(&mlps, x.clone(), experts.clone(), k).expect("batched"), weights.clone()).add(shared.forward(x.clone()));
            let want = with_shared.into_data().try_to_vec::<f32>().expect("f32");
            let got = by_quantized_experts_on_host(&mlps, Some(shared), &x, experts, weights, k).expect("host").into_data().try_to_vec::<f32>().expect("f32");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{rows} rows with a shared expert, element {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn every_expert_path_gives_each_pair_its_experts_output() {
        // 6 rows x top 3 of 8 experts: more pairs than experts, so every path has work to do;
        // the host places them in one run.
        let (n, k, rows) = (8, 3, 6);
        let chosen: Vec<i64> = (0..rows * k).map(|p| ((p / k) * 5 + (p % k) * 3) as i64 % n as i64).collect();
        check_every_path(n, k, 16, 12, rows, chosen);
    }

    #[test]
    fn a_busy_expert_splits_the_host_placed_experts_into_runs() {
        // 8 rows x top 2 of 16 experts, every row choosing expert 3: one run would pad all 16
        // experts to 8 rows (128 rows for 16 pairs).
        let (n, k, rows) = (16usize, 2, 8);
        let chosen: Vec<i64> = (0..rows).flat_map(|r| [3, ((r * 5 + 7) % n) as i64]).collect();
        let mut counts = vec![0; n];
        chosen.iter().for_each(|&e| counts[e as usize] += 1);
        let runs = expert_runs(&counts, padding_budget(rows * k));
        assert!(runs.len() > 1, "{runs:?}");
        assert_eq!(runs.iter().map(|r| r.experts).sum::<usize>(), n);
        assert!(runs.iter().all(|r| r.experts * r.capacity <= 32), "{runs:?}");
        assert!(runs.windows(2).all(|w| w[0].first + w[0].experts == w[1].first), "{runs:?}");
        check_every_path(n, k, 16, 12, rows, chosen);
    }

    #[test]
    fn expert_runs_pad_within_the_budget_unless_one_expert_needs_more() {
        // Evenly routed: one run, as before runs existed.
        assert_eq!(expert_runs(&[3, 4, 2, 4], 16), vec![ExpertRun { first: 0, experts: 4, capacity: 4 }]);
        // A busy expert alone past the budget runs by itself; its neighbours group around it.
        assert_eq!(
            expert_runs(&[1, 1, 20, 1, 0], 8),
            vec![
                ExpertRun { first: 0, experts: 2, capacity: 1 },
                ExpertRun { first: 2, experts: 1, capacity: 32 },
                ExpertRun { first: 3, experts: 2, capacity: 1 },
            ]
        );
        assert_eq!(padding_budget(16), 32);
        assert_eq!(padding_budget(17), 64);
    }

    #[test]
    fn the_cpu_places_decode_batches_on_the_host_past_a_third_of_the_experts() {
        let block = random_block(8, 2, 16, 12, 3);
        assert_eq!(stacked(&block).path(1, 2), ExpertPath::Pairs);
        // 2 rows x 2 = 4 pairs: more than a third of 8 experts, and no kernel on the CPU.
        assert_eq!(stacked(&block).path(2, 2), ExpertPath::HostPlaced);
        assert!(!block.routes_on_device(2));
    }

    #[test]
    fn softmax_router_picks_the_largest_and_renormalises() {
        let logits = [0.0, 2.0, 1.0, -1.0];
        let router = Router::SoftmaxTopK { norm_topk_prob: true };
        let r = route_reference(&router, 2, &logits, None);
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        let e = std::f32::consts::E;
        assert!((r[0].1 - e / (e + 1.0)).abs() < 1e-6 && (r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
        let raw = route_reference(&Router::SoftmaxTopK { norm_topk_prob: false }, 2, &logits, None);
        let z: f32 = logits.iter().map(|l: &f32| l.exp()).sum();
        assert!((raw[0].1 - 2f32.exp() / z).abs() < 1e-6);
        assert_same_routing(&router, 2, &logits, 4, None);
        assert_same_routing(&Router::SoftmaxTopK { norm_topk_prob: false }, 2, &logits, 4, None);
    }

    #[test]
    fn sigmoid_router_uses_the_bias_for_choice_and_groups_for_limits() {
        // Four experts in two groups. Expert 3 has the best raw score but its group loses.
        let logits = [1.0, 0.9, -3.0, 2.0];
        let router = Router::SigmoidGrouped { n_group: 2, topk_group: 1, norm_topk_prob: false, routed_scaling_factor: 2.0 };
        let r = route_reference(&router, 2, &logits, Some(&[0.0, 0.0, 0.0, 0.0]));
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        let s = |l: f32| 1.0 / (1.0 + (-l).exp());
        assert!((r[0].1 - 2.0 * s(1.0)).abs() < 1e-6);
        assert_same_routing(&router, 2, &logits, 4, Some(&[0.0, 0.0, 0.0, 0.0]));
        // A bias moves the choice (and the group) without changing the weights' source.
        let r = route_reference(&router, 2, &logits, Some(&[0.0, 0.0, 5.0, 0.0]));
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!((r[0].1 - 2.0 * s(-3.0)).abs() < 1e-6);
        assert_same_routing(&router, 2, &logits, 4, Some(&[0.0, 0.0, 5.0, 0.0]));
        let norm = Router::SigmoidGrouped { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1.0 };
        let r = route_reference(&norm, 3, &logits, None);
        assert!((r.iter().map(|p| p.1).sum::<f32>() - 1.0).abs() < 1e-6);
        assert_same_routing(&norm, 3, &logits, 4, None);
    }

    #[test]
    fn device_routing_matches_the_reference_on_random_scores() {
        // A fixed LCG: 64 tokens x 32 experts, 8 groups of which 3 are kept, top 6.
        let mut uniform = uniform(0x2545_f491_4f6c_dd1d);
        let mut next = || uniform() * 6.0 - 3.0;
        let logits: Vec<f32> = (0..64 * 32).map(|_| next()).collect();
        let bias: Vec<f32> = (0..32).map(|_| next() * 0.3).collect();
        let grouped = Router::SigmoidGrouped { n_group: 8, topk_group: 3, norm_topk_prob: true, routed_scaling_factor: 2.5 };
        assert_same_routing(&grouped, 6, &logits, 32, Some(&bias));
        assert_same_routing(&Router::SoftmaxTopK { norm_topk_prob: true }, 6, &logits, 32, None);
        assert_same_routing(&Router::SoftmaxTopK { norm_topk_prob: false }, 4, &logits, 32, None);
    }
}
