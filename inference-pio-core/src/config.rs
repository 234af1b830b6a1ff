//! `inference-pio.toml`: host settings and per-plugin sections (profile, optimization
//! overrides, resource limits, security level, sampling defaults).
//!
//! Unknown keys and out-of-range values are errors naming the file, the key and the reason.
//! Profiles expand to concrete [`OptimizationSettings`] that the engine honours.

use crate::types::{DType, DeviceRequest, SamplingOverrides};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// How far a plugin is trusted. `low` and `medium` run the plugin in the host's process;
/// `high` and `maximum` in a sandboxed worker process (see the host's `sandbox` and `worker`
/// modules).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityLevel {
    /// In-process, no checks, fastest.
    #[default]
    Low,
    /// In-process with file-access validation, memory budget, CPU thread cap.
    Medium,
    /// Worker process with rlimits, cgroups, landlock, no network.
    High,
    /// `high` plus seccomp, a pinned plugin hash and kill-on-breach.
    Maximum,
}

impl SecurityLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Maximum => "maximum",
        }
    }

    /// Kept for plugins built against the earlier seam, which refused levels this host did not
    /// enforce: every level is enforced now (`high`/`maximum` by the host's worker process,
    /// around the plugin), so every level is accepted.
    pub fn check_supported(self) -> Result<(), String> {
        Ok(())
    }

    /// Whether plugins at this level run in a worker process.
    pub fn uses_worker(self) -> bool {
        matches!(self, Self::High | Self::Maximum)
    }
}

/// Per-plugin resource limits (the seed's `ResourceLimits`). `None` means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    pub cpu_percent: Option<f64>,
    pub memory_gb: Option<f64>,
    pub gpu_memory_gb: Option<f64>,
    pub disk_space_gb: Option<f64>,
    pub network_bandwidth_mbps: Option<f64>,
}

impl ResourceLimits {
    /// Range checks; returns (key, reason) of the first bad value.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("cpu_percent", self.cpu_percent),
            ("memory_gb", self.memory_gb),
            ("gpu_memory_gb", self.gpu_memory_gb),
            ("disk_space_gb", self.disk_space_gb),
        ];
        for (key, value) in positive {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err((key.into(), format!("must be a positive number, got {v}")));
            }
        }
        if let Some(v) = self.cpu_percent
            && v > 100.0 * 4096.0
        {
            return Err(("cpu_percent".into(), format!("{v} is more than any machine has")));
        }
        if let Some(v) = self.network_bandwidth_mbps
            && !(v.is_finite() && v >= 0.0)
        {
            return Err((
                "network_bandwidth_mbps".into(),
                format!("must be zero or positive, got {v}"),
            ));
        }
        Ok(())
    }

    /// Which limits `level` can enforce. At `low` (in-process) only the memory budgets are
    /// enforced (a model whose weights do not fit is refused before loading); the others need
    /// a worker process, so setting them is an error rather than a promise not kept. The
    /// worker levels enforce all of them, the network as "none at all".
    pub fn check_enforceable(&self, level: SecurityLevel) -> Result<(), (String, String)> {
        if level.uses_worker()
            && let Some(mbps) = self.network_bandwidth_mbps
            && mbps > 0.0
        {
            return Err((
                "network_bandwidth_mbps".into(),
                format!(
                    "{mbps} Mbit/s cannot be honoured at security level `{}`: its worker has no network at all \
                     (only 0 is accepted)",
                    level.as_str()
                ),
            ));
        }
        if level == SecurityLevel::Medium {
            for (key, set) in [("disk_space_gb", self.disk_space_gb.is_some()), ("network_bandwidth_mbps", self.network_bandwidth_mbps.is_some())] {
                if set {
                    return Err((
                        key.into(),
                        "cannot be enforced at security level `medium` (in-process plugins); \
                         memory_gb, gpu_memory_gb and cpu_percent (a thread cap) are"
                            .into(),
                    ));
                }
            }
        }
        if level == SecurityLevel::Low {
            let unenforced = [
                ("cpu_percent", self.cpu_percent.is_some()),
                ("disk_space_gb", self.disk_space_gb.is_some()),
                ("network_bandwidth_mbps", self.network_bandwidth_mbps.is_some()),
            ];
            for (key, set) in unenforced {
                if set {
                    return Err((
                        key.into(),
                        "cannot be enforced at security level `low` (in-process plugins); \
                         only memory_gb and gpu_memory_gb are enforced there"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Merge: values set in `tighter` replace ours.
    pub fn merged_with(&self, tighter: &ResourceLimits) -> ResourceLimits {
        ResourceLimits {
            cpu_percent: tighter.cpu_percent.or(self.cpu_percent),
            memory_gb: tighter.memory_gb.or(self.memory_gb),
            gpu_memory_gb: tighter.gpu_memory_gb.or(self.gpu_memory_gb),
            disk_space_gb: tighter.disk_space_gb.or(self.disk_space_gb),
            network_bandwidth_mbps: tighter.network_bandwidth_mbps.or(self.network_bandwidth_mbps),
        }
    }
}

/// Named bundles of optimization settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    #[default]
    Balanced,
    Performance,
    MemoryEfficient,
    Accuracy,
}

/// Prompt chunk on GPUs where no setting names one: a 2,048-token prefill in 512-token chunks
/// queued four times the kernels, and on the H200 the host's queuing, not the GPU, set its time
/// (benches/results/gpu-h200-2026-12-02-cublas.md).
pub const GPU_PREFILL_CHUNK_TOKENS: u32 = 2048;

/// Prompt chunk on the CPU where no setting names one: a step's activations then stay in the
/// caches. SmolLM2-135M's 1,500-token prompt on two cores took 12.9 s in one pass and 5.7 s in
/// 128-token chunks (6.0 at 256, 9.3 at 1,024); 512 tokens 1.69 s and 1.23 s
/// (benches/results/cpu-2026-12-07e-exact-loops.md).
pub const CPU_PREFILL_CHUNK_TOKENS: u32 = 128;

impl OptimizationSettings {
    /// The prompt chunk in tokens on the CPU (`cpu`) or a GPU (0: the whole prompt in one pass).
    pub fn prefill_chunk_on(&self, cpu: bool) -> u32 {
        self.prefill_chunk_tokens.unwrap_or(if cpu { CPU_PREFILL_CHUNK_TOKENS } else { GPU_PREFILL_CHUNK_TOKENS })
    }
}

impl Profile {
    /// The concrete settings a profile stands for.
    pub fn settings(self) -> OptimizationSettings {
        match self {
            // bf16 on GPU, f32 on CPU; prompt chunks by device (`prefill_chunk_on`).
            Profile::Balanced => OptimizationSettings {
                dtype: None,
                prefill_chunk_tokens: None,
                max_context_tokens: None,
                cuda_graphs: true,
                ..ServingSettings::DEFAULT.into_settings()
            },
            // Whole prompt in one pass: fastest prefill, highest peak activation memory.
            Profile::Performance => OptimizationSettings {
                dtype: None,
                prefill_chunk_tokens: Some(0),
                max_context_tokens: None,
                cuda_graphs: true,
                ..ServingSettings::DEFAULT.into_settings()
            },
            // bf16 everywhere, small prefill chunks, KV cache capped at 8,192 tokens.
            Profile::MemoryEfficient => OptimizationSettings {
                dtype: Some(DType::Bf16),
                prefill_chunk_tokens: Some(128),
                max_context_tokens: Some(8192),
                cuda_graphs: true,
                ..ServingSettings { max_num_seqs: 32, ..ServingSettings::DEFAULT }.into_settings()
            },
            // f32 everywhere, products of quantized weights too: the reference numerics.
            Profile::Accuracy => OptimizationSettings {
                dtype: Some(DType::F32),
                quant_activations: Some(QuantActivations::Exact),
                prefill_chunk_tokens: Some(0),
                max_context_tokens: None,
                cuda_graphs: true,
                ..ServingSettings::DEFAULT.into_settings()
            },
        }
    }
}

/// How a model's linear weights are stored in memory (`quantization`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Every weight in `dtype`: a GGUF file's quantized blocks are dequantized at load.
    None,
    /// Symmetric int8 per output channel, made at load from the checkpoint's values (a GGUF
    /// file's dequantized ones included).
    Int8,
    /// Asymmetric int4 in groups of 128 input channels (32 where 128 does not divide a row),
    /// made at load from the checkpoint's values.
    Int4,
    /// FP8 E4M3 with one scale per block of 128 x 128 (`max|w| / 448`), made at load from the
    /// checkpoint's values: the form of Qwen's FP8 checkpoints, which load as FP8 unasked.
    Fp8,
}

/// How products of quantized weights take their activations (`quant_activations`): the
/// weight's integer codes meet the activations either as they are or rounded per block of 32
/// to integers, which turns the products into integer multiply-adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantActivations {
    /// Unrounded: on the CPU f32 activations against codes converted in registers (the
    /// product of the dequantized weight; the CPU's default for f32 activations); on CUDA
    /// the weight dequantized for every product and multiplied by cuBLAS.
    Exact,
    /// 16-bit integers per block of 32 (a relative error near 2^-16 of each block's largest
    /// value; SmolLM2-135M: mean KL 5e-7 from exact): CUDA's default (its `dp4a` kernel up to
    /// 8 rows) and the CPU's for bf16/f16 activations.
    Int16,
    /// 8-bit integers per block of 32 (llama.cpp's `Q8_1` activations, which its CPU
    /// products of quantized weights always take): 32 products an instruction, the fastest
    /// CPU products, at near 2^-8 of each block's largest value (SmolLM2-135M: mean KL
    /// 0.0021-0.0028 from exact, top-1 agreement 0.97-0.98, as llama.cpp's own 0.0024; int8
    /// weights cost 0.0034). CPU only.
    Int8,
}

/// How the paged KV cache stores keys and values (`kv_cache_dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// In the model's dtype (`dtype`).
    #[default]
    Auto,
    /// The model's dtype when it is bf16 (refused otherwise: the cache is kept in the
    /// attention's dtype or as int8).
    Bf16,
    /// The model's dtype when it is f16 (as `bf16`).
    F16,
    /// The model's dtype when it is f32 (as `bf16`).
    F32,
    /// Symmetric 8-bit integers with one f32 scale per token and key head (`scale = max|x| /
    /// 127`), quantized when written and dequantized inside attention: about half the bytes
    /// of bf16 (1 + 4 / head_dim bytes a value), so about twice the sequences fit.
    Int8,
    /// FP8 E4M3 numbers with one f32 scale per token and key head (`scale = max|x| / 448`):
    /// the same bytes as `int8`, steps relative to each value (1/16 at most) instead of one
    /// step of `max|x| / 127` for all.
    Fp8,
}

impl KvCacheDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::F32 => "f32",
            Self::Int8 => "int8",
            Self::Fp8 => "fp8",
        }
    }

    fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

/// Settings the engine honours. Every key here changes what the engine does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizationSettings {
    /// Weights and activations; `None`: bf16 on CUDA, f32 on CPU.
    pub dtype: Option<DType>,
    /// Linear weights stored quantized, dequantized in the products' kernels. `None`: as the
    /// checkpoint stores them (a GGUF file's quantized blocks and GPTQ/AWQ codes kept; other
    /// checkpoints in `dtype`). Embeddings, norms, routers, experts and the vision tower stay
    /// in `dtype` unless the file stores them quantized; the LM head too unless
    /// [`Self::quantize_lm_head`].
    #[serde(default)]
    pub quantization: Option<Quantization>,
    /// CPU compute threads of the plugin's process (its thread pool, sized once per process;
    /// `limits.cpu_percent` caps it further). `None`: one per core.
    #[serde(default)]
    pub threads: Option<u32>,
    /// With `quantization` `int8`, `int4` or `fp8`: the LM head is quantized as well (a tied head gets
    /// its own quantized copy; the embedding lookup stays in `dtype`). Refused otherwise.
    #[serde(default)]
    pub quantize_lm_head: bool,
    /// How products of quantized weights take their activations. `None`: `exact` for f32
    /// activations on the CPU, else `int16` (the accuracy profile: `exact`). `int8` is
    /// refused on CUDA. FP8 weights take their activations as they are (`exact` dequantizes
    /// them for the matrix product on CUDA); `int8`/`int16` are refused with them.
    #[serde(default)]
    pub quant_activations: Option<QuantActivations>,
    /// Prompts longer than this are prefilled in chunks of this many tokens (0: one pass).
    /// `None`: by device, [`GPU_PREFILL_CHUNK_TOKENS`] on GPUs and [`CPU_PREFILL_CHUNK_TOKENS`]
    /// on the CPU ([`Self::prefill_chunk_on`]).
    #[serde(default)]
    pub prefill_chunk_tokens: Option<u32>,
    /// Caps the KV cache (and so prompt + generation) below the model's own context.
    pub max_context_tokens: Option<u32>,
    /// Steps of decode rows only read their inputs from device buffers refreshed in place;
    /// on CUDA each shape (rows padded to 1, 2, 4 ... 256; context gathered in 256-slot
    /// steps) is recorded once as a CUDA graph and replayed, which removes the host's kernel
    /// queuing. `false`: every step is queued from the host. Numerics are the same either way.
    #[serde(default = "default_true")]
    pub cuda_graphs: bool,
    /// A decode step whose tokens are all picked greedily on the device is queued before the
    /// step ahead of it has been read back: its tokens are gathered from that step's picks on
    /// the device, and the host reads, detokenises and streams the earlier step while the GPU
    /// runs this one (vLLM's async scheduling). `false`: every step is read back before the
    /// next is scheduled. The tokens are the same either way.
    #[serde(default = "default_true")]
    pub async_scheduling: bool,
    /// Sequences the scheduler steps together at most (running decodes plus prefilling
    /// prompts); later requests wait.
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: u32,
    /// Tokens one scheduler step computes at most: one per running decode, then chunks of
    /// waiting prompts filling what is left (chunked prefill).
    #[serde(default = "default_max_num_batched_tokens")]
    pub max_num_batched_tokens: u32,
    /// The paged KV cache's size in GB (decimal). `None`: on CUDA a share
    /// (`gpu_memory_utilization`) of the GPU memory left after the weights, on the CPU 1 GB;
    /// both capped at what `max_num_seqs` full contexts need and at `limits.gpu_memory_gb` /
    /// `memory_gb` minus the weights.
    #[serde(default)]
    pub kv_cache_gb: Option<f64>,
    /// CUDA, when `kv_cache_gb` is unset: the share of the GPU memory free after the weights
    /// that the KV cache takes (vLLM's `gpu_memory_utilization`, here of what is free).
    #[serde(default)]
    pub gpu_memory_utilization: Option<f64>,
    /// Full KV blocks are kept by content hash and reused by later requests with the same
    /// prefix (a shared system prompt is prefilled once). `false`: every prompt is computed.
    #[serde(default = "default_true")]
    pub prefix_caching: bool,
    /// Tokens per KV-cache block (a power of two, 1 to 256).
    #[serde(default = "default_kv_block_tokens")]
    pub kv_block_tokens: u32,
    /// How the KV cache stores keys and values: `auto` (the model's dtype) or `int8` (about
    /// half of bf16's bytes; see [`KvCacheDtype`]). Not sent when `auto`, so plugins built
    /// before it keep loading.
    #[serde(default, skip_serializing_if = "KvCacheDtype::is_auto")]
    pub kv_cache_dtype: KvCacheDtype,
    /// Tensor parallelism (Megatron-LM sharding): the model split over this many ranks, one
    /// thread each, rank `r` on CUDA device `base + r` (the model's device `cuda:base`), its
    /// collectives through NCCL; on the CPU the ranks share the cores and meet in memory.
    /// Each rank loads only its own slices of the checkpoint. `None`: one unsplit model; `1`:
    /// the sharded path with one rank (checks NCCL on one GPU). Decode steps are not recorded
    /// as CUDA graphs while it is set.
    #[serde(default)]
    pub tensor_parallel: Option<u32>,
}

/// The serving (scheduler and KV cache) part of [`OptimizationSettings`], as the profiles set it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServingSettings {
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub prefix_caching: bool,
    pub kv_block_tokens: u32,
}

impl ServingSettings {
    /// vLLM's defaults for one GPU: 256 sequences, a 2,048-token step budget (its chunked
    /// prefill default), prefix caching on; blocks of 16 tokens.
    pub const DEFAULT: Self = Self { max_num_seqs: 256, max_num_batched_tokens: 2048, prefix_caching: true, kv_block_tokens: 16 };

    /// Full settings with these serving values (the rest as the balanced profile's, to be
    /// overridden with struct update syntax).
    pub const fn into_settings(self) -> OptimizationSettings {
        OptimizationSettings {
            dtype: None,
            quantization: None,
            quantize_lm_head: false,
            quant_activations: None,
            threads: None,
            prefill_chunk_tokens: None,
            max_context_tokens: None,
            cuda_graphs: true,
            async_scheduling: true,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            kv_cache_gb: None,
            gpu_memory_utilization: None,
            prefix_caching: self.prefix_caching,
            kv_block_tokens: self.kv_block_tokens,
            kv_cache_dtype: KvCacheDtype::Auto,
            tensor_parallel: None,
        }
    }
}

fn default_max_num_seqs() -> u32 {
    ServingSettings::DEFAULT.max_num_seqs
}

fn default_max_num_batched_tokens() -> u32 {
    ServingSettings::DEFAULT.max_num_batched_tokens
}

fn default_kv_block_tokens() -> u32 {
    ServingSettings::DEFAULT.kv_block_tokens
}

fn default_true() -> bool {
    true
}

impl Default for OptimizationSettings {
    fn default() -> Self {
        Profile::default().settings()
    }
}

impl OptimizationSettings {
    pub const KEYS: [&'static str; 17] = [
        "dtype",
        "quantization",
        "quantize_lm_head",
        "quant_activations",
        "threads",
        "prefill_chunk_tokens",
        "max_context_tokens",
        "cuda_graphs",
        "async_scheduling",
        "max_num_seqs",
        "max_num_batched_tokens",
        "kv_cache_gb",
        "gpu_memory_utilization",
        "prefix_caching",
        "kv_block_tokens",
        "kv_cache_dtype",
        "tensor_parallel",
    ];

    /// Values that cannot work; returns (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((k.to_string(), r));

        if self.max_context_tokens == Some(0) {
            return bad("max_context_tokens", "must be at least 1".into());
        }
        if let Some(t) = self.threads
            && !(1..=4096).contains(&t)
        {
            return bad("threads", format!("must be 1 to 4096, got {t}"));
        }
        if self.quantize_lm_head && !matches!(self.quantization, Some(Quantization::Int8 | Quantization::Int4 | Quantization::Fp8)) {
            return bad("quantize_lm_head", "needs quantization = \"int8\", \"int4\" or \"fp8\" (the head is quantized as the other linear weights are)".into());
        }
        if self.quantization == Some(Quantization::Fp8) && matches!(self.quant_activations, Some(QuantActivations::Int8 | QuantActivations::Int16)) {
            return bad(
                "quant_activations",
                "rounds activations to integers for weights of integer codes; FP8 weights (quantization = \"fp8\") take their activations as they are: leave it unset or \"exact\"".into(),
            );
        }
        if self.max_num_seqs == 0 || self.max_num_seqs > 4096 {
            return bad("max_num_seqs", format!("must be 1 to 4096, got {}", self.max_num_seqs));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(
                "max_num_batched_tokens",
                format!(
                    "{} is less than max_num_seqs ({}): a step must hold one token of every running sequence",
                    self.max_num_batched_tokens, self.max_num_seqs
                ),
            );
        }
        if !(self.kv_block_tokens.is_power_of_two() && self.kv_block_tokens <= 256) {
            return bad("kv_block_tokens", format!("must be a power of two from 1 to 256, got {}", self.kv_block_tokens));
        }
        if let Some(n) = self.tensor_parallel
            && !(1..=64).contains(&n)
        {
            return bad("tensor_parallel", format!("must be 1 to 64 ranks, got {n}"));
        }
        if let Some(gb) = self.kv_cache_gb
            && !(gb.is_finite() && gb > 0.0)
        {
            return bad("kv_cache_gb", format!("must be positive, got {gb}"));
        }
        if let Some(u) = self.gpu_memory_utilization {
            if !(u.is_finite() && u > 0.0 && u <= 1.0) {
                return bad("gpu_memory_utilization", format!("must be in (0, 1], got {u}"));
            }
            if self.kv_cache_gb.is_some() {
                return bad("gpu_memory_utilization", "set either kv_cache_gb or gpu_memory_utilization, not both".into());
            }
        }
        Ok(())
    }

    /// Keys that size the KV cache at load, so cannot change while a model is loaded.
    pub fn load_time_keys_changed(&self, other: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.dtype != other.dtype {
            changed.push("dtype");
        }
        if self.quantization != other.quantization {
            changed.push("quantization");
        }
        if self.quantize_lm_head != other.quantize_lm_head {
            changed.push("quantize_lm_head");
        }
        if self.quant_activations != other.quant_activations {
            changed.push("quant_activations");
        }
        if self.threads != other.threads {
            changed.push("threads");
        }
        if self.max_context_tokens != other.max_context_tokens {
            changed.push("max_context_tokens");
        }
        if self.kv_cache_gb != other.kv_cache_gb {
            changed.push("kv_cache_gb");
        }
        if self.gpu_memory_utilization != other.gpu_memory_utilization {
            changed.push("gpu_memory_utilization");
        }
        if self.kv_block_tokens != other.kv_block_tokens {
            changed.push("kv_block_tokens");
        }
        if self.kv_cache_dtype != other.kv_cache_dtype {
            changed.push("kv_cache_dtype");
        }
        if self.tensor_parallel != other.tensor_parallel {
            changed.push("tensor_parallel");
        }
        changed
    }
}

/// The `[host]` table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// Extra plugin directories (relative paths are relative to the config file).
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// Default `--device`.
    pub device: Option<String>,
    /// Where plugins may keep caches; default: the per-user cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Seconds a plugin may take to answer the metadata probe during discovery.
    pub probe_timeout_s: Option<f64>,
}

/// The `[server]` table: defaults for `inference-pio serve` (its flags override them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on (default 127.0.0.1).
    pub host: Option<String>,
    /// Port (default 8000; 0: any free port).
    pub port: Option<u16>,
    /// File of accepted API keys, one per line (relative paths: relative to this file).
    pub api_key_file: Option<PathBuf>,
    /// Listen on a non-loopback address without API keys.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Requests admitted at once (default 256).
    pub max_queue: Option<usize>,
    /// The longest a request may run, in seconds (default 600).
    pub request_timeout_s: Option<f64>,
    /// After SIGTERM or ctrl-c, how long running requests may take to finish before the
    /// server exits anyway, in seconds (default 30).
    pub drain_timeout_s: Option<f64>,
    /// Directories whose image files a chat request may name by path (an `image_url` of
    /// `file:///...` or an absolute path); none by default, when only inline `data:` URLs
    /// are taken.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
}

/// The uid and gid of a worker started by a root host when the config names none (`nobody`).
pub const DEFAULT_WORKER_ID: u32 = 65534;

/// A `[plugins.<id>]` table as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub profile: Option<Profile>,
    pub security: Option<SecurityLevel>,
    /// Overrides the profile's dtype.
    pub dtype: Option<DType>,
    /// Overrides the profile's `quantization`.
    pub quantization: Option<Quantization>,
    /// Overrides the profile's `quantize_lm_head`.
    pub quantize_lm_head: Option<bool>,
    #[serde(default)]
    pub quant_activations: Option<QuantActivations>,
    /// Sets `threads`.
    pub threads: Option<u32>,
    pub prefill_chunk_tokens: Option<u32>,
    pub max_context_tokens: Option<u32>,
    /// Overrides the profile's `cuda_graphs`.
    pub cuda_graphs: Option<bool>,
    /// Overrides the profile's `async_scheduling`.
    pub async_scheduling: Option<bool>,
    /// Override the profile's scheduler and KV-cache settings (see [`OptimizationSettings`]).
    pub max_num_seqs: Option<u32>,
    pub max_num_batched_tokens: Option<u32>,
    pub kv_cache_gb: Option<f64>,
    pub gpu_memory_utilization: Option<f64>,
    pub prefix_caching: Option<bool>,
    pub kv_block_tokens: Option<u32>,
    pub kv_cache_dtype: Option<KvCacheDtype>,
    pub tensor_parallel: Option<u32>,
    #[serde(default)]
    pub limits: ResourceLimits,
    /// `high`/`maximum`: run anyway (with a warning naming them) when the kernel lacks some of
    /// the level's mechanisms (landlock, cgroup controllers, NVML). Default: refuse the level.
    #[serde(default)]
    pub allow_degraded: bool,
    /// The plugin file's sha256 (hex). Required at `maximum`; checked before the plugin is
    /// loaded at every level where it is set.
    pub sha256: Option<String>,
    /// `high`/`maximum`: seconds the worker may stay silent (no token, no answer) during a
    /// call before it is killed as hung (default 600).
    pub timeout_s: Option<f64>,
    /// `high`/`maximum` on a host running as root: the uid and gid the worker runs as
    /// (default [`DEFAULT_WORKER_ID`], `nobody`); never 0. A host that is not root runs its
    /// workers as its own uid.
    pub worker_uid: Option<u32>,
    pub worker_gid: Option<u32>,
    /// `high`/`maximum`: jail the worker in a user namespace (default true). `false` (for
    /// kernels hardened against user namespaces): a root host makes the other namespaces as
    /// root and drops to `worker_uid` with setresuid; a host that is not root cannot jail.
    pub user_namespace: Option<bool>,
    /// Sampling defaults for this plugin's models.
    #[serde(default)]
    pub sampling: SamplingOverrides,
}

impl PluginSection {
    /// The profile with this section's overrides applied.
    pub fn optimization(&self) -> OptimizationSettings {
        let mut settings = self.profile.unwrap_or_default().settings();
        if let Some(dtype) = self.dtype {
            settings.dtype = Some(dtype);
        }
        if let Some(q) = self.quantization {
            settings.quantization = Some(q);
        }
        if let Some(head) = self.quantize_lm_head {
            settings.quantize_lm_head = head;
        }
        if self.quant_activations.is_some() {
            settings.quant_activations = self.quant_activations;
        }
        if let Some(t) = self.threads {
            settings.threads = Some(t);
        }
        if let Some(chunk) = self.prefill_chunk_tokens {
            settings.prefill_chunk_tokens = Some(chunk);
        }
        if let Some(max) = self.max_context_tokens {
            settings.max_context_tokens = Some(max);
        }
        if let Some(graphs) = self.cuda_graphs {
            settings.cuda_graphs = graphs;
        }
        if let Some(on) = self.async_scheduling {
            settings.async_scheduling = on;
        }
        if let Some(n) = self.max_num_seqs {
            settings.max_num_seqs = n;
        }
        if let Some(n) = self.max_num_batched_tokens {
            settings.max_num_batched_tokens = n;
        }
        if self.kv_cache_gb.is_some() {
            settings.kv_cache_gb = self.kv_cache_gb;
        }
        if self.gpu_memory_utilization.is_some() {
            settings.gpu_memory_utilization = self.gpu_memory_utilization;
        }
        if let Some(on) = self.prefix_caching {
            settings.prefix_caching = on;
        }
        if let Some(n) = self.kv_block_tokens {
            settings.kv_block_tokens = n;
        }
        if let Some(d) = self.kv_cache_dtype {
            settings.kv_cache_dtype = d;
        }
        if self.tensor_parallel.is_some() {
            settings.tensor_parallel = self.tensor_parallel;
        }
        settings
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    #[serde(default)]
    pub host: HostSection,
    #[serde(default)]
    pub server: ServerSection,
    /// Keyed by plugin id.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSection>,
    /// Where it was read from (not in the file).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

impl HostConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages and to resolve
    /// relative plugin directories.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: HostConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.path = Some(path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in &mut config.host.plugin_dirs {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if let Some(file) = &mut config.server.api_key_file
            && file.is_relative()
        {
            *file = base.join(&*file);
        }
        config.validate()?;
        Ok(config)
    }

    fn invalid(&self, key: String, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone().unwrap_or_default(),
            key,
            reason,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(device) = &self.host.device {
            device
                .parse::<DeviceRequest>()
                .map_err(|reason| self.invalid("host.device".into(), reason))?;
        }
        if let Some(t) = self.host.probe_timeout_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(self.invalid("host.probe_timeout_s".into(), format!("must be positive, got {t}")));
        }
        if let Some(host) = &self.server.host
            && host.parse::<std::net::IpAddr>().is_err()
        {
            return Err(self.invalid("server.host".into(), format!("`{host}` is not an IP address")));
        }
        if self.server.max_queue == Some(0) {
            return Err(self.invalid("server.max_queue".into(), "must be at least 1".into()));
        }
        if let Some(t) = self.server.drain_timeout_s
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(self.invalid("server.drain_timeout_s".into(), format!("must be zero or more, got {t}")));
        }
        if let Some(t) = self.server.request_timeout_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(self.invalid("server.request_timeout_s".into(), format!("must be positive, got {t}")));
        }
        for (id, section) in &self.plugins {
            let prefix = format!("plugins.{id}");
            section
                .limits
                .validate()
                .map_err(|(key, reason)| self.invalid(format!("{prefix}.limits.{key}"), reason))?;
            let level = section.security.unwrap_or_default();
            if let Some(hash) = &section.sha256
                && !(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(self.invalid(format!("{prefix}.sha256"), format!("must be 64 hex digits, got `{hash}`")));
            }
            if level == SecurityLevel::Maximum && section.sha256.is_none() {
                return Err(self.invalid(
                    format!("{prefix}.sha256"),
                    "security level `maximum` needs the plugin file's sha256 pinned (`sha256sum` of the library)".into(),
                ));
            }
            if let Some(t) = section.timeout_s
                && !(t.is_finite() && t > 0.0)
            {
                return Err(self.invalid(format!("{prefix}.timeout_s"), format!("must be positive, got {t}")));
            }
            for (key, id) in [("worker_uid", section.worker_uid), ("worker_gid", section.worker_gid)] {
                if id == Some(0) {
                    return Err(self.invalid(format!("{prefix}.{key}"), "must not be 0 (root): the worker runs unprivileged".into()));
                }
            }
            if !level.uses_worker() {
                for (key, set) in [
                    ("allow_degraded", section.allow_degraded),
                    ("timeout_s", section.timeout_s.is_some()),
                    ("worker_uid", section.worker_uid.is_some()),
                    ("worker_gid", section.worker_gid.is_some()),
                    ("user_namespace", section.user_namespace.is_some()),
                ] {
                    if set {
                        return Err(self.invalid(
                            format!("{prefix}.{key}"),
                            format!("only means something at security levels `high` and `maximum` (worker process), not `{}`", level.as_str()),
                        ));
                    }
                }
            }
            section
                .limits
                .check_enforceable(level)
                .map_err(|(key, reason)| self.invalid(format!("{prefix}.limits.{key}"), reason))?;
            section
                .optimization()
                .validate()
                .map_err(|(key, reason)| self.invalid(format!("{prefix}.{key}"), reason))?;
            validate_sampling(&section.sampling)
                .map_err(|(key, reason)| self.invalid(format!("{prefix}.sampling.{key}"), reason))?;
        }
        Ok(())
    }

    /// The section for `plugin_id`, or the defaults.
    pub fn plugin(&self, plugin_id: &str) -> PluginSection {
        self.plugins.get(plugin_id).cloned().unwrap_or_default()
    }
}

/// Range checks for sampling values; returns (key, reason).
pub fn validate_sampling(s: &SamplingOverrides) -> Result<(), (String, String)> {
    if let Some(t) = s.temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(("temperature".into(), format!("must be >= 0, got {t}")));
    }
    if let Some(p) = s.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(("top_p".into(), format!("must be in (0, 1], got {p}")));
    }
    if let Some(p) = s.min_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(("min_p".into(), format!("must be in [0, 1], got {p}")));
    }
    if let Some(r) = s.repetition_penalty
        && !(r.is_finite() && r > 0.0)
    {
        return Err(("repetition_penalty".into(), format!("must be > 0, got {r}")));
    }
    if s.max_new_tokens == Some(0) {
        return Err(("max_new_tokens".into(), "must be at least 1".into()));
    }
    for (key, value) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
        if let Some(p) = value
            && !(-2.0..=2.0).contains(&p)
        {
            return Err((key.into(), format!("must be in [-2, 2], got {p}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostConfig, ConfigError> {
        HostConfig::parse(text, Path::new("/etc/inference-pio.toml"))
    }

    #[test]
    fn profiles_expand_and_overrides_win() {
        let config = parse(
            "[plugins.qwen]\nprofile = \"memory-efficient\"\nprefill_chunk_tokens = 64\n",
        )
        .expect("valid");
        let settings = config.plugin("qwen").optimization();
        assert_eq!(settings.dtype, Some(DType::Bf16));
        assert_eq!(settings.prefill_chunk_tokens, Some(64));
        assert_eq!(settings.max_context_tokens, Some(8192));
        assert_eq!(settings.max_num_seqs, 32);
        assert!(settings.cuda_graphs, "profiles record decode steps");
        assert_eq!(config.plugin("other").optimization(), Profile::Balanced.settings());
        let off = parse("[plugins.qwen]\ncuda_graphs = false\n").expect("valid");
        assert!(!off.plugin("qwen").optimization().cuda_graphs);
        assert!(settings.async_scheduling, "profiles queue greedy decode steps ahead");
        let sync = parse("[plugins.qwen]\nasync_scheduling = false\n").expect("valid");
        assert!(!sync.plugin("qwen").optimization().async_scheduling);
        let serving = parse(
            "[plugins.qwen]\nmax_num_seqs = 8\nmax_num_batched_tokens = 64\nkv_cache_gb = 2.5\nprefix_caching = false\nkv_block_tokens = 32\n",
        )
        .expect("valid");
        let fp8 = parse("[plugins.qwen]\nquantization = \"fp8\"\nquantize_lm_head = true\nquant_activations = \"exact\"\n").expect("valid");
        assert_eq!(fp8.plugin("qwen").optimization().quantization, Some(Quantization::Fp8));
        let s = serving.plugin("qwen").optimization();
        assert_eq!((s.max_num_seqs, s.max_num_batched_tokens, s.kv_cache_gb, s.prefix_caching, s.kv_block_tokens), (8, 64, Some(2.5), false, 32));
        assert_eq!(settings.tensor_parallel, None, "one unsplit model unless asked");
        let split = parse("[plugins.qwen]
tensor_parallel = 2
").expect("valid");
        assert_eq!(split.plugin("qwen").optimization().tensor_parallel, Some(2));
        for bad in [0, 65] {
            let s = OptimizationSettings { tensor_parallel: Some(bad), ..Default::default() };
            assert_eq!(s.validate().expect_err("refused").0, "tensor_parallel");
        }
    }

    #[test]
    fn serving_settings_that_cannot_work_are_rejected_with_key() {
        for (text, key) in [
            ("max_num_seqs = 0", "max_num_seqs"),
            ("max_num_seqs = 64\nmax_num_batched_tokens = 32", "max_num_batched_tokens"),
            ("kv_block_tokens = 24", "kv_block_tokens"),
            ("kv_cache_gb = 0", "kv_cache_gb"),
            ("gpu_memory_utilization = 1.5", "gpu_memory_utilization"),
            ("kv_cache_gb = 1\ngpu_memory_utilization = 0.5", "gpu_memory_utilization"),
            ("max_context_tokens = 0", "max_context_tokens"),
            ("quantize_lm_head = true", "quantize_lm_head"),
            ("quantization = \"fp8\"\nquant_activations = \"int16\"", "quant_activations"),
            ("quantization = \"fp8\"\nquant_activations = \"int8\"", "quant_activations"),
        ] {
            let err = parse(&format!("[plugins.qwen]\n{text}\n")).expect_err(text);
            assert!(err.to_string().contains(&format!("plugins.qwen.{key}")), "{text}: {err}");
        }
    }

    #[test]
    fn the_kv_cache_dtype_is_read() {
        let s = parse("[plugins.qwen]\nkv_cache_dtype = \"int8\"\n").expect("parses").plugins["qwen"].optimization();
        assert_eq!(s.kv_cache_dtype, KvCacheDtype::Int8);
        assert_eq!(parse("[plugins.qwen]\n").expect("parses").plugins["qwen"].optimization().kv_cache_dtype, KvCacheDtype::Auto);
        let s = parse("[plugins.qwen]\nkv_cache_dtype = \"fp8\"\n").expect("parses").plugins["qwen"].optimization();
        assert_eq!(s.kv_cache_dtype, KvCacheDtype::Fp8);
        assert!(parse("[plugins.qwen]\nkv_cache_dtype = \"int4\"\n").expect_err("unknown").to_string().contains("kv_cache_dtype"));
        // `auto` is not sent (plugins built before the key keep loading); `int8` is.
        let auto = serde_json::to_string(&OptimizationSettings::default()).expect("json");
        assert!(!auto.contains("kv_cache_dtype"), "{auto}");
        let int8 = serde_json::to_string(&OptimizationSettings { kv_cache_dtype: KvCacheDtype::Int8, ..Default::default() }).expect("json");
        assert!(int8.contains("\"kv_cache_dtype\":\"int8\""), "{int8}");
    }

    #[test]
    fn unknown_keys_name_file_and_key() {
        let err = parse("[plugins.qwen]\nturbo = true\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("/etc/inference-pio.toml") && msg.contains("turbo"), "{msg}");
    }

    #[test]
    fn out_of_range_values_are_rejected_with_key() {
        let err = parse("[plugins.qwen.limits]\nmemory_gb = -1\n").expect_err("negative");
        assert!(err.to_string().contains("plugins.qwen.limits.memory_gb"), "{err}");
        let err = parse("[plugins.qwen.sampling]\ntop_p = 1.5\n").expect_err("top_p");
        assert!(err.to_string().contains("plugins.qwen.sampling.top_p"), "{err}");
        let err = parse("[host]\ndevice = \"tpu\"\n").expect_err("device");
        assert!(err.to_string().contains("host.device"), "{err}");
        let err = parse("[plugins.qwen]\nprofile = \"fast\"\n").expect_err("profile");
        assert!(err.to_string().contains("fast"), "{err}");
    }

    #[test]
    fn the_server_section_is_read_and_checked() {
        let config = parse("[server]\nhost = \"0.0.0.0\"\nport = 9000\napi_key_file = \"keys\"\nmax_queue = 8\nrequest_timeout_s = 30\ndrain_timeout_s = 5\n").expect("valid");
        assert_eq!(config.server.port, Some(9000));
        assert_eq!(config.server.drain_timeout_s, Some(5.0));
        assert!(config.server.api_key_file.as_deref().is_some_and(|p| p.is_absolute() && p.ends_with("keys")));
        for (text, key) in [
            ("[server]\nhost = \"localhost:80\"\n", "server.host"),
            ("[server]\nmax_queue = 0\n", "server.max_queue"),
            ("[server]\nrequest_timeout_s = -1\n", "server.request_timeout_s"),
            ("[server]\ndrain_timeout_s = -1\n", "server.drain_timeout_s"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(key), "{err}");
        }
        assert!(parse("[server]\nprot = 1\n").is_err(), "unknown keys are refused");
    }

    #[test]
    fn worker_ids_are_never_root_and_only_for_workers() {
        let err = parse("[plugins.qwen]\nsecurity = \"high\"\nworker_uid = 0\n").expect_err("root uid");
        assert!(err.to_string().contains("plugins.qwen.worker_uid") && err.to_string().contains("root"), "{err}");
        let err = parse("[plugins.qwen]\nsecurity = \"high\"\nworker_gid = 0\n").expect_err("root gid");
        assert!(err.to_string().contains("plugins.qwen.worker_gid"), "{err}");
        let err = parse("[plugins.qwen]\nsecurity = \"medium\"\nworker_uid = 1000\n").expect_err("in-process");
        assert!(err.to_string().contains("plugins.qwen.worker_uid"), "{err}");
        let ok = parse("[plugins.qwen]\nsecurity = \"high\"\nworker_uid = 1000\nworker_gid = 1000\n").expect("worker ids");
        assert_eq!(ok.plugin("qwen").worker_uid, Some(1000));
    }

    #[test]
    fn unenforceable_settings_are_refused() {
        let err = parse("[plugins.qwen]\nsecurity = \"maximum\"\n").expect_err("maximum without a hash");
        assert!(err.to_string().contains("plugins.qwen.sha256"), "{err}");
        let err = parse("[plugins.qwen]\nsecurity = \"high\"\n[plugins.qwen.limits]\nnetwork_bandwidth_mbps = 5\n").expect_err("net at high");
        assert!(err.to_string().contains("no network at all"), "{err}");
        parse("[plugins.qwen]\nsecurity = \"high\"\n[plugins.qwen.limits]\nnetwork_bandwidth_mbps = 0\ndisk_space_gb = 1\ncpu_percent = 50\n")
            .expect("high enforces every limit, the network as none");
        let err = parse("[plugins.qwen]\nsecurity = \"medium\"\ntimeout_s = 3\n").expect_err("timeout in-process");
        assert!(err.to_string().contains("plugins.qwen.timeout_s"), "{err}");
        let err = parse("[plugins.qwen]\nsecurity = \"maximum\"\nsha256 = \"abc\"\n").expect_err("short hash");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let err = parse("[plugins.qwen.limits]\nnetwork_bandwidth_mbps = 10\n").expect_err("net");
        assert!(err.to_string().contains("network_bandwidth_mbps"), "{err}");
        parse("[plugins.qwen.limits]\nmemory_gb = 8\ngpu_memory_gb = 20\n").expect("memory limits");
    }

    #[test]
    fn relative_plugin_dirs_resolve_against_the_file() {
        let config = parse("[host]\nplugin_dirs = [\"plugins\", \"/abs\"]\n").expect("valid");
        assert_eq!(
            config.host.plugin_dirs,
            vec![PathBuf::from("/etc/plugins"), PathBuf::from("/abs")]
        );
    }
}
