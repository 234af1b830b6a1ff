//! Tensor parallelism: one model's layers split across ranks (Megatron-LM, Shoeybi et al. 2019,
//! "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism";
//! vLLM's `ColumnParallelLinear`, `RowParallelLinear`, `VocabParallelEmbedding` and its fused-MoE
//! expert parallelism).
//!
//! - q/k/v and gate/up are column-parallel: a rank holds its attention heads' rows and its
//!   share of the MLP's inner rows, so its attention and SwiGLU run on its own heads and rows.
//! - o and down are row-parallel: a rank holds the matching input columns, its product is a
//!   partial sum, and an all-reduce after each completes it (a bias is added once, by rank 0).
//! - KV heads are split with the query heads that read them, or replicated when there are
//!   fewer KV heads than ranks (each rank keeps the one its query heads share).
//! - The embedding and the LM head are vocabulary-parallel: a rank holds a range of rows; a
//!   token outside it looks up zeros and the all-reduce brings its row, and each rank's logits
//!   for its range are gathered side by side.
//! - Mixture-of-experts layers split the routed experts across ranks (expert parallelism):
//!   every rank routes with the whole router, runs the pairs whose expert it holds (the others
//!   weigh zero), and the all-reduce after the layer sums the ranks' outputs; shared experts are
//!   split like a dense MLP.
//!
//! A rank's decoder is the ordinary [`Decoder`](crate::decoder::Decoder) built from a config
//! with its share of heads and inner rows ([`RankShard::local_config`]), its checkpoint reading
//! only its slices ([`ShardRules`]), and a [`Collective`] for the reductions. The ranks run as
//! threads of one process (`crate::serve::ranks`: the step loop's thread is rank 0): on the
//! CPU they meet in memory ([`InProcessGroup`], which the CPU tests check against the
//! unsharded model), on GPUs through NCCL ([`NcclGroup`], one GPU per rank).

use crate::decoder::DecoderSpec;
use crate::error::EngineError;
use crate::hf_config::DecoderConfig;
use burn::tensor::{DType as BurnDType, Tensor, TensorData};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What one rank of `ranks` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankShard {
    pub rank: usize,
    pub ranks: usize,
    /// Query heads.
    pub heads: Range<usize>,
    /// KV heads (one replicated head when there are fewer KV heads than ranks).
    pub kv_heads: Range<usize>,
    /// Rows of a dense MLP's `intermediate_size`.
    pub intermediate: Range<usize>,
    /// Routed experts, for a mixture-of-experts model.
    pub experts: Option<Range<usize>>,
    /// Rows of the shared experts' inner width.
    pub shared_intermediate: Option<Range<usize>>,
    /// Rows of the embedding table and the LM head.
    pub vocab: Range<usize>,
}

fn part(total: usize, ranks: usize, rank: usize) -> Range<usize> {
    let n = total / ranks;
    rank * n..(rank + 1) * n
}

/// How `config` splits over `ranks`: one [`RankShard`] per rank, or an error naming the number
/// that does not divide.
pub fn plan(c: &DecoderConfig, spec: &DecoderSpec, ranks: usize) -> Result<Vec<RankShard>, EngineError> {
    let refuse = |what: &str, n: usize| Err(EngineError::Config(format!("tensor_parallel = {ranks}: {what} ({n}) does not divide by {ranks}")));
    if ranks == 0 {
        return Err(EngineError::Config("tensor_parallel must be at least 1".into()));
    }
    if spec.vision.is_some() {
        return Err(EngineError::Unsupported("tensor parallelism of a vision-language model (its vision tower) is not supported".into()));
    }
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    if !nh.is_multiple_of(ranks) {
        return refuse("num_attention_heads", nh);
    }
    if !nkv.is_multiple_of(ranks) && !ranks.is_multiple_of(nkv) {
        return Err(EngineError::Config(format!(
            "tensor_parallel = {ranks}: num_key_value_heads ({nkv}) neither divides by {ranks} nor divides it (to be replicated)"
        )));
    }
    let dense_layers = spec.moe.as_ref().is_none_or(|m| m.sparse_layers.iter().any(|s| !s));
    if dense_layers && !c.intermediate_size.is_multiple_of(ranks) {
        return refuse("intermediate_size", c.intermediate_size);
    }
    if let Some(m) = &spec.moe {
        if !m.num_experts.is_multiple_of(ranks) {
            return refuse("the number of routed experts", m.num_experts);
        }
        if let Some(shared) = m.shared_intermediate
            && !shared.is_multiple_of(ranks)
        {
            return refuse("the shared experts' inner width", shared);
        }
    }
    if !c.vocab_size.is_multiple_of(ranks) {
        return refuse("vocab_size", c.vocab_size);
    }
    Ok((0..ranks)
        .map(|rank| RankShard {
            rank,
            ranks,
            heads: part(nh, ranks, rank),
            kv_heads: if nkv >= ranks { part(nkv, ranks, rank) } else { rank / (ranks / nkv)..rank / (ranks / nkv) + 1 },
            intermediate: part(c.intermediate_size, ranks, rank),
            experts: spec.moe.as_ref().map(|m| part(m.num_experts, ranks, rank)),
            shared_intermediate: spec.moe.as_ref().and_then(|m| m.shared_intermediate).map(|s| part(s, ranks, rank)),
            vocab: part(c.vocab_size, ranks, rank),
        })
        .collect())
}

impl RankShard {
    /// The config this rank's decoder is built from: its heads and inner rows (the vocabulary
    /// stays whole: the logits are gathered back to it).
    pub fn local_config(&self, c: &DecoderConfig) -> DecoderConfig {
        let mut local = c.clone();
        local.num_attention_heads = self.heads.len();
        local.num_key_value_heads = self.kv_heads.len();
        local.intermediate_size = self.intermediate.len();
        local
    }

    /// The spec this rank's decoder is built from: its share of the shared experts.
    pub fn local_spec(&self, spec: &DecoderSpec) -> DecoderSpec {
        let mut local = spec.clone();
        if let (Some(m), Some(shared)) = (local.moe.as_mut(), &self.shared_intermediate) {
            m.shared_intermediate = Some(shared.len());
        }
        local
    }

    /// The slice of each sharded tensor this rank reads (names as in the checkpoint).
    pub fn rules(&self, c: &DecoderConfig, spec: &DecoderSpec) -> ShardRules {
        let d = c.head_dim;
        let mut rules = HashMap::new();
        let rows = |r: &Range<usize>, scale: usize, of: usize| Slice::Rows { range: r.start * scale..r.end * scale, of };
        let columns = |r: &Range<usize>, scale: usize, of: usize| Slice::Columns { range: r.start * scale..r.end * scale, of };
        let m = &spec.prefix;
        for l in 0..c.num_hidden_layers {
            let p = format!("{m}.layers.{l}");
            let attn = |n: &str| format!("{p}.self_attn.{n}");
            for suffix in ["weight", "bias"] {
                rules.insert(attn(&format!("q_proj.{suffix}")), rows(&self.heads, d, c.num_attention_heads * d));
                for kv in ["k_proj", "v_proj"] {
                    rules.insert(attn(&format!("{kv}.{suffix}")), rows(&self.kv_heads, d, c.num_key_value_heads * d));
                }
            }
            rules.insert(attn("o_proj.weight"), columns(&self.heads, d, c.num_attention_heads * d));
            if self.rank != 0 {
                rules.insert(attn("o_proj.bias"), Slice::Zero);
            }
            let sparse = spec.moe.as_ref().is_some_and(|moe| moe.sparse_layers.get(l).copied().unwrap_or(false));
            let mlp = |prefix: &str, inner: &Range<usize>, of: usize, rules: &mut HashMap<String, Slice>| {
                for proj in ["gate_proj", "up_proj"] {
                    rules.insert(format!("{prefix}.{proj}.weight"), rows(inner, 1, of));
                }
                rules.insert(format!("{prefix}.down_proj.weight"), columns(inner, 1, of));
            };
            if !sparse {
                mlp(&format!("{p}.mlp"), &self.intermediate, c.intermediate_size, &mut rules);
            } else if let (Some(shared), Some(of)) = (&self.shared_intermediate, spec.moe.as_ref().and_then(|m| m.shared_intermediate)) {
                mlp(&format!("{p}.mlp.shared_experts"), shared, of, &mut rules);
            }
        }
        rules.insert(format!("{m}.embed_tokens.weight"), rows(&self.vocab, 1, c.vocab_size));
        rules.insert("lm_head.weight".to_string(), rows(&self.vocab, 1, c.vocab_size));
        ShardRules(rules)
    }
}

/// The part of a tensor a rank reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    /// Rows `range` of a tensor with `of` rows (its first axis).
    Rows { range: Range<usize>, of: usize },
    /// Columns `range` of a 2-D tensor with `of` columns.
    Columns { range: Range<usize>, of: usize },
    /// Zeros (a row-parallel bias on ranks other than 0).
    Zero,
}

impl Slice {
    /// The whole tensor's shape, from the slice's shape.
    pub fn full_shape(&self, local: &[usize]) -> Vec<usize> {
        let mut full = local.to_vec();
        match self {
            Slice::Rows { of, .. } => full[0] = *of,
            Slice::Columns { of, .. } => full[1] = *of,
            Slice::Zero => {}
        }
        full
    }

    /// The slice of `bytes` (the whole tensor of `full` shape, `element` bytes a value).
    pub fn cut(&self, bytes: &[u8], full: &[usize], element: usize) -> Vec<u8> {
        let row_bytes = full[1..].iter().product::<usize>() * element;
        match self {
            Slice::Rows { range, .. } => bytes[range.start * row_bytes..range.end * row_bytes].to_vec(),
            Slice::Columns { range, .. } => {
                let (a, b) = (range.start * element, range.end * element);
                bytes.chunks_exact(row_bytes).flat_map(|row| row[a..b].iter().copied()).collect()
            }
            Slice::Zero => vec![0; bytes.len()],
        }
    }

    /// The slice of a tensor of `full` shape, on its device.
    pub fn narrow<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        match self {
            Slice::Rows { range, .. } => t.narrow(0, range.start, range.len()),
            Slice::Columns { range, .. } => t.narrow(1, range.start, range.len()),
            Slice::Zero => t.zeros_like(),
        }
    }
}

/// The sharded tensors of one rank, by name ([`RankShard::rules`]); others are read whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardRules(pub HashMap<String, Slice>);

impl ShardRules {
    pub fn get(&self, name: &str) -> Option<&Slice> {
        self.0.get(name)
    }
}

/// The collective operations a rank's forward pass needs.
pub trait Collective: Send + Sync {
    /// The sum of every rank's `x`, on every rank.
    fn all_reduce_sum(&self, rank: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError>;
    /// Every rank's `x` (`[rows, cols_r]`) side by side in rank order, on every rank.
    fn all_gather_columns(&self, rank: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError>;
}

/// One rank's values on the host, and their `[rows, cols]`.
type HostPart = (Vec<f32>, [usize; 2]);

/// Ranks that are threads of one process: each puts its values on the host, waits for the
/// others, and combines all of them in rank order (so every rank gets the same bits).
pub struct InProcessGroup {
    ranks: usize,
    /// Ranks arrived at the current meeting, and how many meetings have completed.
    meeting: Mutex<(usize, u64)>,
    arrived: Condvar,
    slots: Mutex<Vec<HostPart>>,
    timeout: Duration,
}

/// How long a rank waits for the others at a collective before it gives up (one failed or
/// stuck rank must not hang the rest).
pub const MEETING_TIMEOUT: Duration = Duration::from_secs(120);

impl InProcessGroup {
    pub fn new(ranks: usize) -> Arc<Self> {
        Self::with_timeout(ranks, MEETING_TIMEOUT)
    }

    /// A group whose ranks give up waiting for each other after `timeout`.
    pub fn with_timeout(ranks: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self { ranks, meeting: Mutex::new((0, 0)), arrived: Condvar::new(), slots: Mutex::new(vec![(Vec::new(), [0, 0]); ranks]), timeout })
    }

    /// Waits until every rank has arrived (a barrier that gives up after its timeout).
    fn meet(&self, rank: usize) -> Result<(), EngineError> {
        let failed = || EngineError::Device("a rank failed during a collective".into());
        let mut meeting = self.meeting.lock().map_err(|_| failed())?;
        meeting.0 += 1;
        if meeting.0 == self.ranks {
            *meeting = (0, meeting.1 + 1);
            self.arrived.notify_all();
            return Ok(());
        }
        let generation = meeting.1;
        let deadline = Instant::now() + self.timeout;
        while meeting.1 == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EngineError::Device(format!("rank {rank} waited {:?} for the other ranks at a collective", self.timeout)));
            }
            meeting = self.arrived.wait_timeout(meeting, left).map_err(|_| failed())?.0;
        }
        Ok(())
    }

    /// Every rank's values and shape, once all have put theirs.
    fn exchange(&self, rank: usize, x: Tensor<2>) -> Result<Vec<HostPart>, EngineError> {
        let dims = x.dims();
        let values = x
            .cast(BurnDType::F32)
            .try_into_data()
            .map_err(|e| EngineError::Device(format!("rank {rank}: reading a collective's input: {e}")))?
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| EngineError::Device(format!("rank {rank}: a collective's input: {e:?}")))?;
        self.slots.lock().map_err(|_| EngineError::Device("a rank failed during a collective".into()))?[rank] = (values, dims);
        self.meet(rank)?;
        let all = self.slots.lock().map_err(|_| EngineError::Device("a rank failed during a collective".into()))?.clone();
        // Nobody writes its slot again before everyone has read this round's.
        self.meet(rank)?;
        Ok(all)
    }
}

/// f32 host values as a tensor of `dtype` on `device` (a collective's result, in its input's dtype).
fn host_tensor(values: Vec<f32>, dims: [usize; 2], device: &burn::tensor::Device, dtype: BurnDType) -> Tensor<2> {
    let t = Tensor::<2>::from_data(TensorData::new(values, dims), (device, BurnDType::F32));
    if dtype == BurnDType::F32 { t } else { t.cast(dtype) }
}

impl Collective for InProcessGroup {
    fn all_reduce_sum(&self, rank: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        let (device, dtype) = (x.device(), x.dtype());
        let all = self.exchange(rank, x)?;
        let dims = all[0].1;
        if all.iter().any(|(_, d)| *d != dims) || all.len() != self.ranks {
            return Err(EngineError::Device(format!("rank {rank}: the ranks' shapes differ in an all-reduce")));
        }
        let mut sum = vec![0f32; dims[0] * dims[1]];
        for (values, _) in &all {
            sum.iter_mut().zip(values).for_each(|(s, v)| *s += v);
        }
        Ok(host_tensor(sum, dims, &device, dtype))
    }

    fn all_gather_columns(&self, rank: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        let (device, dtype) = (x.device(), x.dtype());
        let all = self.exchange(rank, x)?;
        let rows = all[0].1[0];
        if all.iter().any(|(_, d)| d[0] != rows) {
            return Err(EngineError::Device(format!("rank {rank}: the ranks' row counts differ in an all-gather")));
        }
        let cols: usize = all.iter().map(|(_, d)| d[1]).sum();
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for (values, d) in &all {
                out.extend_from_slice(&values[r * d[1]..(r + 1) * d[1]]);
            }
        }
        Ok(host_tensor(out, [rows, cols], &device, dtype))
    }
}

/// Ranks on GPUs, one each, meeting through NCCL on the devices
/// ([`inference_pio_kernels::nccl`]): the collectives are queued on each rank's CUDA stream
/// with its kernels, and nothing goes through the host.
pub struct NcclGroup {
    comms: inference_pio_kernels::nccl::Comms,
}

impl NcclGroup {
    /// A communicator for each CUDA device in `ordinals` (rank `r` on `ordinals[r]`).
    pub fn new(ordinals: &[usize]) -> Result<Arc<Self>, EngineError> {
        let comms = inference_pio_kernels::nccl::Comms::init_all(ordinals).map_err(|e| EngineError::Device(format!("tensor parallelism over CUDA devices {ordinals:?}: {e}")))?;
        Ok(Arc::new(Self { comms }))
    }
}

impl NcclGroup {
    /// NCCL's reductions here take bf16, f16 or f32 (anything else is refused, not queued).
    fn check(rank: usize, x: &Tensor<2>) -> Result<(), EngineError> {
        match x.dtype() {
            BurnDType::BF16 | BurnDType::F16 | BurnDType::F32 => Ok(()),
            other => Err(EngineError::Device(format!("rank {rank}: a collective of {other:?} values (NCCL here takes bf16, f16 or f32)"))),
        }
    }
}

impl Collective for NcclGroup {
    fn all_reduce_sum(&self, rank: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        Self::check(rank, &x)?;
        Ok(inference_pio_kernels::nccl::all_reduce_sum(&self.comms, rank, x))
    }

    fn all_gather_columns(&self, rank: usize, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        Self::check(rank, &x)?;
        let [rows, cols] = x.dims();
        let ranks = self.comms.ranks();
        // Stacked by rank, `[ranks, rows, cols]`, then each row's parts side by side.
        let stacked = inference_pio_kernels::nccl::all_gather_rows(&self.comms, rank, x);
        Ok(stacked.reshape([ranks, rows, cols]).swap_dims(0, 1).reshape([rows, ranks * cols]))
    }
}

/// The group `ranks.len()` ranks meet in: NCCL over the CUDA devices `ordinals` on GPUs, in
/// memory on the CPU.
pub fn group_for(on_gpu: bool, ordinals: &[usize]) -> Result<Arc<dyn Collective>, EngineError> {
    Ok(if on_gpu { NcclGroup::new(ordinals)? } else { InProcessGroup::new(ordinals.len()) })
}

/// A rank's place in its group, as its decoder uses it: what it holds, and the group its
/// reductions meet in.
#[derive(Clone)]
pub struct TpRank {
    pub shard: RankShard,
    pub group: Arc<dyn Collective>,
}

impl TpRank {
    pub fn all_reduce(&self, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        self.group.all_reduce_sum(self.shard.rank, x)
    }

    pub fn all_gather_columns(&self, x: Tensor<2>) -> Result<Tensor<2>, EngineError> {
        self.group.all_gather_columns(self.shard.rank, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn config(heads: usize, kv: usize, inter: usize, vocab: usize) -> DecoderConfig {
        let json = format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": {vocab}, "hidden_size": 32, "intermediate_size": {inter},
            "num_hidden_layers": 2, "num_attention_heads": {heads}, "num_key_value_heads": {kv}, "head_dim": 8, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 64, "rope_theta": 10000.0}}"#
        );
        DecoderConfig::from_json_str(&json).expect("config")
    }

    #[test]
    fn heads_split_and_kv_heads_split_or_replicate() {
        let c = config(8, 2, 64, 128);
        let spec = DecoderSpec::dense(&c, true);
        let two = plan(&c, &spec, 2).expect("2 ranks");
        assert_eq!((two[1].heads.clone(), two[1].kv_heads.clone(), two[1].intermediate.clone(), two[1].vocab.clone()), (4..8, 1..2, 32..64, 64..128));
        // 4 ranks over 2 KV heads: ranks 0-1 keep head 0, ranks 2-3 head 1 (the one their
        // query heads read: query heads 4-5 and 6-7 are in the second group of 4).
        let four = plan(&c, &spec, 4).expect("4 ranks");
        assert_eq!(four.iter().map(|s| s.kv_heads.clone()).collect::<Vec<_>>(), vec![0..1, 0..1, 1..2, 1..2]);
        assert_eq!(four[3].heads, 6..8);
        assert_eq!(four[2].local_config(&c).num_key_value_heads, 1);
    }

    #[test]
    fn a_number_that_does_not_divide_is_refused_with_the_numbers() {
        let c = config(6, 3, 64, 128);
        let spec = DecoderSpec::dense(&c, true);
        let e = plan(&c, &spec, 4).expect_err("6 heads over 4 ranks").to_string();
        assert!(e.contains("num_attention_heads (6) does not divide by 4"), "{e}");
        let e = plan(&config(6, 3, 64, 128), &spec, 2).expect_err("3 KV heads over 2 ranks").to_string();
        assert!(e.contains("num_key_value_heads (3)"), "{e}");
        let e = plan(&config(8, 2, 60, 128), &spec, 8).expect_err("60 rows over 8 ranks").to_string();
        assert!(e.contains("intermediate_size (60) does not divide by 8"), "{e}");
        let e = plan(&config(8, 2, 64, 100), &spec, 8).expect_err("vocab 100 over 8 ranks").to_string();
        assert!(e.contains("vocab_size (100) does not divide by 8"), "{e}");
    }

    #[test]
    fn slices_cut_rows_and_columns_of_the_stored_bytes() {
        // A [3, 4] tensor of one-byte values 0..12.
        let bytes: Vec<u8> = (0..12).collect();
        let rows = Slice::Rows { range: 1..3, of: 3 };
        assert_eq!(rows.full_shape(&[2, 4]), vec![3, 4]);
        assert_eq!(rows.cut(&bytes, &[3, 4], 1), vec![4, 5, 6, 7, 8, 9, 10, 11]);
        let columns = Slice::Columns { range: 2..4, of: 4 };
        assert_eq!(columns.full_shape(&[3, 2]), vec![3, 4]);
        assert_eq!(columns.cut(&bytes, &[3, 4], 1), vec![2, 3, 6, 7, 10, 11]);
        // Two-byte values: columns 0..1 of a [2, 2] tensor.
        assert_eq!(Slice::Columns { range: 0..1, of: 2 }.cut(&[1, 2, 3, 4, 5, 6, 7, 8], &[2, 2], 2), vec![1, 2, 5, 6]);
        assert_eq!(Slice::Zero.cut(&[1, 2, 3], &[3], 1), vec![0, 0, 0]);
    }

    #[test]
    fn a_rank_left_alone_at_a_collective_gives_up_with_an_error() {
        let group = InProcessGroup::with_timeout(2, Duration::from_millis(50));
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32], [1, 1]), &Device::flex());
        let e = group.all_reduce_sum(0, x).expect_err("rank 1 never comes").to_string();
        assert!(e.contains("rank 0 waited"), "{e}");
    }

    #[test]
    fn the_in_process_group_sums_and_gathers_in_rank_order() {
        let group = InProcessGroup::new(3);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let group = Arc::clone(&group);
                    s.spawn(move || {
                        let d = Device::flex();
                        let x = Tensor::<2>::from_data(TensorData::new(vec![rank as f32, 10.0 * rank as f32], [1, 2]), &d);
                        let sum = group.all_reduce_sum(rank, x.clone()).expect("sum");
                        let gathered = group.all_gather_columns(rank, x).expect("gather");
                        let v = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
                        (v(sum), v(gathered))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank")).collect()
        });
        for (sum, gathered) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
        }
    }
}
