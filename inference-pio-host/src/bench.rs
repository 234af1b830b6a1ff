//! `inference-pio bench`: the benchmark suite every plugin gets, through the calls the host
//! makes (in this process, or through the sandboxed worker at `high`/`maximum`), on any
//! plugin and model. One run writes `DIR/report.json` (machine, GPU, driver, commit, command,
//! every setting, every measurement) and `DIR/report.html`, a self-contained page with the
//! same tables and SVG plots drawn by `plotters`.
//!
//! Suites (vLLM's `benchmark_latency` / `benchmark_throughput` / `benchmark_serving` are the
//! models for the first two):
//! - `speed`: time to first token, prefill and decode rates for prompts of 20, 50, 100, 512
//!   and 2,048 tokens, and decode over 128 and 512 new tokens (medians over `--runs`);
//! - `throughput`: sequential requests, batches (`infer_batch`) of 1, 8, 32 and 64 rows,
//!   16 and 64 concurrent requests (one thread each, meeting in the plugin's scheduler), and
//!   sustained load (a fixed request rate for a fixed time; p50/p99 latency per window);
//! - `memory`: resident memory of the process holding the model (this one, or the worker)
//!   and its GPU memory (NVML) at baseline, after `initialize`, after `load_model`, at the
//!   peak of the run, after `cleanup`, and after a second load/cleanup cycle: memory that
//!   grows from one cycle to the next is a leak and fails the run (exit 1);
//! - `power`: CPU utilisation (`/proc`) idle and while generating; GPU power and energy
//!   (NVML) and CPU package energy (RAPL, where readable); tokens per joule;
//! - `optimization`: the model reloaded per [`Variant`] (the most exact mode, the baseline,
//!   each reported optimization switched off, the other weight modes, all off), each measured
//!   for speed, memory and its divergence from the most exact mode (KL and top-1 agreement
//!   over the evaluation texts, as llama.cpp's `llama-perplexity --kl-divergence`);
//! - `accuracy`: the chosen settings against the most exact mode, and perplexity.
//!
//! Nothing here is a pass/fail timing: the numbers are recorded, not judged (the leak check
//! excepted). `--quick` shrinks every size so that CI proves the command on a tiny model.

use crate::cli::Host;
use crate::handle::PluginHandle;
use crate::selection::{read_model_config, select};
use anyhow::{Context, bail};
use inference_pio_core::config::{KvCacheDtype, OptimizationSettings, QuantActivations, Quantization};
use inference_pio_core::types::{
    BatchInferRequest, ConfigUpdate, DType, DeviceRequest, InferRequest, InferResponse, LoadOptions, ModelInfo, PromptInput, SamplingOverrides, SamplingParams, ScoreRequest, ScoreResponse,
};
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A suite of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    Speed,
    Throughput,
    Memory,
    Power,
    Optimization,
    Accuracy,
}

impl Suite {
    pub const ALL: [Suite; 6] = [Suite::Speed, Suite::Throughput, Suite::Memory, Suite::Power, Suite::Optimization, Suite::Accuracy];
}

/// `--suite` values: a suite's name, or `all`.
pub fn parse_suites(s: &str) -> Result<Vec<Suite>, String> {
    match s {
        "all" => Ok(Suite::ALL.to_vec()),
        "speed" => Ok(vec![Suite::Speed]),
        "throughput" => Ok(vec![Suite::Throughput]),
        "memory" => Ok(vec![Suite::Memory]),
        "power" => Ok(vec![Suite::Power]),
        "optimization" => Ok(vec![Suite::Optimization]),
        "accuracy" => Ok(vec![Suite::Accuracy]),
        _ => Err(format!("unknown suite `{s}` (speed, throughput, memory, power, optimization, accuracy, all)")),
    }
}

/// What one `bench` run measures and with what sizes.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub suites: Vec<Suite>,
    /// Runs of each speed case (the median is reported).
    pub runs: usize,
    pub prompt_lengths: Vec<usize>,
    /// New tokens of the prompt-length cases.
    pub new_tokens: usize,
    /// Decode lengths of the generation cases (100-token prompt).
    pub generation_lengths: Vec<usize>,
    pub sequential_requests: usize,
    pub batch_sizes: Vec<usize>,
    pub concurrency: Vec<usize>,
    /// Sustained load: requests a second, for this many seconds, each of `sustained_new_tokens`.
    pub rate: f64,
    pub duration_s: f64,
    pub sustained_new_tokens: usize,
    /// Seconds of idle measured by the power suite.
    pub idle_s: f64,
}

impl Plan {
    pub fn new(suites: Vec<Suite>, quick: bool, runs: Option<usize>, rate: Option<f64>, duration_s: Option<f64>) -> Self {
        if quick {
            Plan {
                suites,
                runs: runs.unwrap_or(1),
                prompt_lengths: vec![20, 50, 100],
                new_tokens: 16,
                generation_lengths: vec![16, 32],
                sequential_requests: 3,
                batch_sizes: vec![1, 4],
                concurrency: vec![4],
                rate: rate.unwrap_or(4.0),
                duration_s: duration_s.unwrap_or(2.0),
                sustained_new_tokens: 8,
                idle_s: 0.5,
            }
        } else {
            Plan {
                suites,
                runs: runs.unwrap_or(3),
                prompt_lengths: vec![20, 50, 100, 512, 2048],
                new_tokens: 128,
                generation_lengths: vec![128, 512],
                sequential_requests: 8,
                batch_sizes: vec![1, 8, 32, 64],
                concurrency: vec![16, 64],
                rate: rate.unwrap_or(2.0),
                duration_s: duration_s.unwrap_or(30.0),
                sustained_new_tokens: 64,
                idle_s: 3.0,
            }
        }
    }

    fn has(&self, s: Suite) -> bool {
        self.suites.contains(&s)
    }
}

/// Deterministic prompt ids for benchmarking: `len` ids drawn (a fixed LCG, `seed`) from the
/// middle three quarters of the vocabulary, away from the special tokens models keep at
/// either end.
pub fn prompt_ids(len: usize, vocab: u64, seed: u64) -> Vec<u32> {
    let (lo, hi) = (vocab / 8, (vocab * 7 / 8).max(vocab / 8 + 1));
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (lo + (state >> 33) % (hi - lo)) as u32
        })
        .collect()
}

/// One greedy request of `prompt` ids (seeded) and `new` tokens to model `handle`.
fn infer_on(plugin: &PluginHandle, handle: u64, vocab: u64, prompt: usize, new: usize, seed: u64) -> anyhow::Result<InferResponse> {
    let req = request(prompt_ids(prompt, vocab, seed), new);
    plugin.infer(handle, &req, &mut |_, _, _| true).map_err(|e| anyhow::anyhow!("{e}"))
}

fn request(ids: Vec<u32>, new_tokens: usize) -> InferRequest {
    InferRequest {
        input: PromptInput::TokenIds(ids),
        sampling: SamplingParams {
            greedy: true,
            values: SamplingOverrides { max_new_tokens: Some(new_tokens as u32), ..Default::default() },
            seed: None,
            ignore_eos: true,
        },
        stop: Vec::new(),
        cache_salt: String::new(),
        logprobs: None,
        constraint: None,
        images: Vec::new(),
    }
}

/// The value at quantile `q` (0..=1) of `xs`, nearest rank; 0 for none.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn median(xs: &[f64]) -> f64 {
    quantile(xs, 0.5)
}

/// Resident memory and GPU memory of one process, sampled in the background for its peak.
struct Watch {
    pid: u32,
    nvml: Option<Arc<nvml_wrapper::Nvml>>,
    peak: Arc<Mutex<(u64, u64)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(pid: u32, nvml: Option<Arc<nvml_wrapper::Nvml>>) -> Self {
        let peak = Arc::new(Mutex::new((0, 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, n) = (peak.clone(), stop.clone(), nvml.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let now = sample(pid, n.as_deref());
                if let Ok(mut m) = p.lock() {
                    *m = (m.0.max(now.0), m.1.max(now.1));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch { pid, nvml, peak, stop, thread: Some(thread) }
    }

    fn now(&self) -> (u64, u64) {
        sample(self.pid, self.nvml.as_deref())
    }

    fn peak(&self) -> (u64, u64) {
        let now = self.now();
        self.peak.lock().map(|m| (m.0.max(now.0), m.1.max(now.1))).unwrap_or(now)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (resident bytes of `pid`, GPU bytes NVML attributes to `pid`).
fn sample(pid: u32, nvml: Option<&nvml_wrapper::Nvml>) -> (u64, u64) {
    (crate::worker::tree_rss_bytes(&[pid]), nvml.map_or(0, |n| crate::worker::gpu_bytes(n, pid)))
}

/// CPU seconds (user + system, with reaped children) `pid` has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(())?;
    crate::worker::cpu_seconds(&[pid], ticks as f64)
}

/// The CPU package energy counter (RAPL, microjoules) and its wrap-around range, if readable.
fn rapl_uj() -> Option<(u64, u64)> {
    let base = Path::new("/sys/class/powercap/intel-rapl:0");
    let read = |f: &str| std::fs::read_to_string(base.join(f)).ok()?.trim().parse::<u64>().ok();
    Some((read("energy_uj")?, read("max_energy_range_uj").unwrap_or(u64::MAX)))
}

/// GPU power and energy readings of one device through NVML.
struct GpuPower {
    nvml: Arc<nvml_wrapper::Nvml>,
    index: u32,
}

impl GpuPower {
    fn watts(&self) -> Option<f64> {
        self.nvml.device_by_index(self.index).ok()?.power_usage().ok().map(|mw| f64::from(mw) / 1e3)
    }
    fn energy_j(&self) -> Option<f64> {
        self.nvml.device_by_index(self.index).ok()?.total_energy_consumption().ok().map(|mj| mj as f64 / 1e3)
    }
}

/// `n` calls of `f` (given 0..n), each on its own thread, released together: the wall time
/// from their release until the last returned, and their responses.
fn together<F>(n: usize, f: F) -> anyhow::Result<(f64, Vec<InferResponse>)>
where
    F: Fn(usize) -> anyhow::Result<InferResponse> + Sync,
{
    let barrier = std::sync::Barrier::new(n + 1);
    let (wall, results) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, f) = (&barrier, &f);
                scope.spawn(move || {
                    barrier.wait();
                    f(i)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let results: Vec<anyhow::Result<InferResponse>> = threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a request thread panicked")))).collect();
        (start.elapsed().as_secs_f64(), results)
    });
    Ok((wall, results.into_iter().collect::<anyhow::Result<Vec<_>>>()?))
}

/// The evaluation texts (`eval-texts.json`, written for this repository: prose, code, a chat
/// turn and a list), teacher-forced by the accuracy and optimization-impact suites.
pub fn eval_texts() -> Vec<String> {
    let parsed: Value = serde_json::from_str(include_str!("eval-texts.json")).unwrap_or(Value::Null);
    parsed["texts"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// One way of running the model that the optimization-impact suite measures.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    pub name: String,
    pub settings: OptimizationSettings,
    /// The load's dtype (`None`: the plugin's default for the device).
    pub dtype: Option<DType>,
}

/// Optimizations of the product's plan that are no setting of a plugin unless it reports
/// them: each variant measures them as they are built in.
const BUILT_IN: [(&str, &str); 2] = [
    ("fused kernels", "always on: no setting switches them off"),
    ("cuBLAS", "always used on CUDA for the dense products: no setting"),
];

/// The variants measured, in order: the most exact mode (f32, every weight dequantized where
/// the plugin reports `quantization`), which the others are compared with; the baseline (the
/// settings in force); each optimization the plugin reports and the baseline has on, switched
/// off alone; each other quantization mode; on the CPU the quantized products' 8-bit
/// activations; and all the switches off together.
pub fn variants(baseline: &OptimizationSettings, dtype: Option<DType>, reported: &[String], quantized_checkpoint: bool, cpu: bool) -> Vec<Variant> {
    let has = |key: &str| reported.iter().any(|r| r == key);
    let mut exact = baseline.clone();
    exact.dtype = Some(DType::F32);
    if has("quantization") {
        exact.quantization = Some(Quantization::None);
        exact.quantize_lm_head = false;
    }
    if has("quant_activations") {
        exact.quant_activations = Some(QuantActivations::Exact);
    }
    if has("kv_cache_dtype") {
        exact.kv_cache_dtype = KvCacheDtype::Auto;
    }
    let mut out = vec![
        Variant { name: "most exact (f32, weights dequantized)".into(), settings: exact, dtype: Some(DType::F32) },
        Variant { name: "baseline".into(), settings: baseline.clone(), dtype },
    ];
    type Switch = (&'static str, &'static str, fn(&OptimizationSettings) -> bool, fn(&mut OptimizationSettings));
    let switches: [Switch; 4] = [
        ("cuda_graphs", "CUDA graphs off", |s| s.cuda_graphs, |s| s.cuda_graphs = false),
        ("async_scheduling", "async scheduling off", |s| s.async_scheduling, |s| s.async_scheduling = false),
        ("prefix_caching", "prefix caching off", |s| s.prefix_caching, |s| s.prefix_caching = false),
        ("prefill_chunk_tokens", "chunked prefill off", |s| s.prefill_chunk_tokens != Some(0), |s| s.prefill_chunk_tokens = Some(0)),
    ];
    let mut all_off = baseline.clone();
    let mut switched = 0;
    for (key, name, on, off) in switches {
        if has(key) && on(baseline) {
            let mut v = baseline.clone();
            off(&mut v);
            off(&mut all_off);
            switched += 1;
            out.push(Variant { name: name.into(), settings: v, dtype });
        }
    }
    if has("quantization") {
        let mut modes = vec![(Quantization::Int8, "int8 weights"), (Quantization::Int4, "int4 weights"), (Quantization::Fp8, "fp8 weights")];
        if quantized_checkpoint {
            modes.push((Quantization::None, "checkpoint's quantized weights dequantized"));
        }
        for (q, name) in modes {
            if baseline.quantization != Some(q) {
                let mut v = baseline.clone();
                v.quantization = Some(q);
                v.quantize_lm_head = false;
                // FP8 products take their activations as they are (integer roundings are refused).
                if q == Quantization::Fp8 && matches!(v.quant_activations, Some(QuantActivations::Int8 | QuantActivations::Int16)) {
                    v.quant_activations = None;
                }
                out.push(Variant { name: name.into(), settings: v, dtype });
            }
        }
    }
    // The KV cache in int8 (half of bf16's bytes).
    if has("kv_cache_dtype") && baseline.kv_cache_dtype != KvCacheDtype::Int8 {
        let mut v = baseline.clone();
        v.kv_cache_dtype = KvCacheDtype::Int8;
        out.push(Variant { name: "int8 KV cache".into(), settings: v, dtype });
    }
    // Quantized weights in use on the CPU: their products with 8-bit activations.
    if has("quant_activations") && cpu && quantized_checkpoint && baseline.quant_activations != Some(QuantActivations::Int8) {
        let mut v = baseline.clone();
        v.quant_activations = Some(QuantActivations::Int8);
        out.push(Variant { name: "8-bit activations in quantized products".into(), settings: v, dtype });
    }
    if switched > 1 {
        out.push(Variant { name: "all switches off".into(), settings: all_off, dtype });
    }
    out
}

/// Perplexity over several scored texts together: exp of the mean negative log-likelihood
/// of every predicted token.
pub fn pooled_perplexity(scores: &[ScoreResponse]) -> Option<f64> {
    let (mut nll, mut tokens) = (0.0, 0usize);
    for s in scores {
        if let Some(m) = s.mean_nll {
            let n = s.token_ids.len().saturating_sub(1);
            nll += m * n as f64;
            tokens += n;
        }
    }
    (tokens > 0).then(|| (nll / tokens as f64).exp())
}

/// The divergence of `got` from `reference` over every position of every text; an error when
/// the texts were tokenized differently or logits are missing.
pub fn texts_divergence(reference: &[ScoreResponse], got: &[ScoreResponse]) -> Result<inference_pio_core::metrics::Divergence, String> {
    if reference.len() != got.len() {
        return Err(format!("{} texts scored against {}", got.len(), reference.len()));
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (r, g) in reference.iter().zip(got) {
        if r.token_ids != g.token_ids {
            return Err("the texts were tokenized differently".into());
        }
        let (Some(rl), Some(gl)) = (&r.logits, &g.logits) else { return Err("the plugin returned no logits".into()) };
        if rl.len() != gl.len() {
            return Err(format!("{} logit rows against {}", gl.len(), rl.len()));
        }
        a.extend(rl.iter().cloned());
        b.extend(gl.iter().cloned());
    }
    Ok(inference_pio_core::metrics::divergence(&a, &b))
}

/// The optimization table's divergences, variant by variant in order: each row gets its
/// divergence over the evaluation texts (`divergence_from_most_exact`, and
/// `divergence_reference`: whose) from the first variant's scores. Where the first scored
/// nothing (a model too large for f32 on its device: Qwen3-Coder-30B needs 122 GB), the first
/// variant that did is the reference of the ones after it, and its own row says so. Only the
/// reference's scores are kept (a variant's logits over the texts can be hundreds of MB).
#[derive(Default)]
struct Divergences {
    reference: Option<(Vec<ScoreResponse>, String)>,
    /// Why the first variant scored nothing.
    most_exact_missing: Option<String>,
}

impl Divergences {
    fn add(&mut self, name: &str, mut row: Value, scores: Vec<ScoreResponse>) -> Value {
        // Every variant before this one either became the reference or, as the first, left why not.
        let first = self.reference.is_none() && self.most_exact_missing.is_none();
        if scores.is_empty() {
            if first {
                let why = ["load_error", "refused", "score_error"].iter().find_map(|k| (!row[*k].is_null()).then(|| row[*k].to_string()));
                self.most_exact_missing = Some(why.unwrap_or_else(|| "it scored nothing".into()));
            }
        } else if let Some((r, reference_name)) = &self.reference {
            row["divergence_from_most_exact"] = match texts_divergence(r, &scores) {
                Ok(d) => json!(d),
                Err(e) => json!({"error": e}),
            };
            row["divergence_reference"] = json!(reference_name);
        } else {
            if let Some(why) = &self.most_exact_missing {
                row["divergence_from_most_exact"] = json!({"error": format!("the most exact variant did not run ({why}): this variant is the reference of those after it")});
            }
            self.reference = Some((scores, name.to_string()));
        }
        row
    }
}

/// Everything a run needs: the plugin, the model's handle and shape, the plan.
struct Bench<'a> {
    plugin: &'a PluginHandle,
    handle: u64,
    info: ModelInfo,
    plan: &'a Plan,
    bar: indicatif::ProgressBar,
    /// What variants reload: the model and the load options, the process holding it.
    model_path: &'a Path,
    options: LoadOptions,
    pid: u32,
    nvml: Option<Arc<nvml_wrapper::Nvml>>,
}

impl Bench<'_> {
    fn fits(&self, prompt: usize, new: usize) -> bool {
        (prompt + new) as u64 <= self.info.max_context
    }

    fn infer(&self, prompt: usize, new: usize, seed: u64) -> anyhow::Result<InferResponse> {
        infer_on(self.plugin, self.handle, self.info.vocab_size, prompt, new, seed)
    }

    fn step(&self, what: String) {
        // Without a terminal the bar draws nothing: each step is a log line instead, so a
        // run that fails in a log file says where.
        if self.bar.is_hidden() {
            tracing::info!("bench step {}: {what}", self.bar.position() + 1);
        }
        self.bar.set_message(what);
        self.bar.inc(1);
    }

    fn speed(&self) -> anyhow::Result<Value> {
        let p = self.plan;
        // A first request builds and tunes the kernels; it is not reported.
        self.step("speed: warm-up".into());
        self.infer(p.prompt_lengths[0].min(16), 4, 999)?;
        let mut cases = Vec::new();
        let mut run_case = |kind: &str, prompt: usize, new: usize| -> anyhow::Result<()> {
            if !self.fits(prompt, new) {
                cases.push(json!({"kind": kind, "prompt_tokens": prompt, "new_tokens": new, "skipped": format!("past the model's context of {}", self.info.max_context)}));
                return Ok(());
            }
            // Each case's shape once untimed, on a prompt of its own (no prefix-cache hit for the
            // timed runs): a prefill of a new length compiles and tunes kernels on first use
            // (on a GPU, a mixture-of-experts model's expert batches), which a single timed run
            // (`--runs 1`) measured instead of the prefill: 1.29 s for 100 tokens of the 12-layer
            // Qwen3-Coder-30B against 26-54 ms warm (H100, 2026-12-06).
            self.step(format!("speed: {prompt}-token prompt, {new} new tokens, warm-up"));
            self.infer(prompt, 2.min(new), (prompt * 31 + new * 1009) as u64 + 1_000_003)?;
            let (mut ttft, mut prefill, mut decode, mut steady) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in 0..p.runs {
                self.step(format!("speed: {prompt}-token prompt, {new} new tokens, run {}", r + 1));
                // Every case and run its own prompt: none is a prefix-cache hit of another.
                let t = self.infer(prompt, new, (prompt * 31 + new * 1009 + r) as u64)?.timings;
                ttft.push(t.time_to_first_token_s);
                prefill.push(t.prefill_tokens_per_s);
                decode.push(t.decode_tokens_per_s);
                steady.push(t.steady_decode_tokens_per_s);
            }
            cases.push(json!({
                "kind": kind, "prompt_tokens": prompt, "new_tokens": new, "runs": p.runs,
                "time_to_first_token_s": median(&ttft), "prefill_tokens_per_s": median(&prefill),
                "decode_tokens_per_s": median(&decode), "steady_decode_tokens_per_s": median(&steady),
            }));
            Ok(())
        };
        for &prompt in &p.prompt_lengths {
            run_case("prompt", prompt, p.new_tokens)?;
        }
        for &new in &p.generation_lengths {
            run_case("generation", 100.min(p.prompt_lengths.iter().copied().max().unwrap_or(100)), new)?;
        }
        Ok(json!({ "cases": cases }))
    }

    fn throughput(&self) -> anyhow::Result<Value> {
        let p = self.plan;
        let (prompt, new) = (100, p.new_tokens);
        if !self.fits(prompt, new) {
            bail!("the throughput suite's {prompt}-token prompts with {new} new tokens do not fit the model's context of {}", self.info.max_context);
        }
        // Sequential: one request after another.
        self.step("throughput: sequential".into());
        let start = Instant::now();
        let mut generated = 0;
        for i in 0..p.sequential_requests {
            generated += self.infer(prompt, new, 5000 + i as u64)?.token_ids.len();
        }
        let wall = start.elapsed().as_secs_f64();
        let sequential = json!({"requests": p.sequential_requests, "prompt_tokens": prompt, "new_tokens": new, "wall_s": wall,
            "output_tokens_per_s": generated as f64 / wall, "requests_per_s": p.sequential_requests as f64 / wall});
        // Batches through `infer_batch`, each size run once untimed first on prompts of its own:
        // on a GPU a size's first batch records its decode steps (CUDA graphs) and compiles
        // its shapes inside the run (the 2026-12-06 H100 run: 32 rows at 3,976 tok/s steady,
        // against 6,140 in a warm serving run).
        let batch = |rows: usize, seed: u64| {
            let requests = (0..rows).map(|i| request(prompt_ids(prompt, self.info.vocab_size, seed + i as u64), new)).collect();
            self.plugin.infer_batch(self.handle, &BatchInferRequest { requests }).map_err(|e| anyhow::anyhow!("{e}"))
        };
        let mut batches = Vec::new();
        for &rows in &p.batch_sizes {
            self.step(format!("throughput: batch of {rows}"));
            batch(rows, 66_000)?;
            let start = Instant::now();
            let out = batch(rows, 6000)?;
            let wall = start.elapsed().as_secs_f64();
            let generated: usize = out.responses.iter().map(|r| r.token_ids.len()).sum();
            batches.push(json!({"rows": rows, "wall_s": wall, "output_tokens_per_s": generated as f64 / wall,
                "steady_decode_tokens_per_s": out.timings.steady_decode_tokens_per_s}));
        }
        // Concurrent requests, each on its own thread, released together.
        let mut concurrent = Vec::new();
        for &n in &p.concurrency {
            self.step(format!("throughput: {n} concurrent requests"));
            let (wall, results) = self.together(n, prompt, new, 7000)?;
            let generated: usize = results.iter().map(|r| r.token_ids.len()).sum();
            let ttft: Vec<f64> = results.iter().map(|r| r.timings.time_to_first_token_s + r.timings.queued_s).collect();
            concurrent.push(json!({"requests": n, "wall_s": wall, "output_tokens_per_s": generated as f64 / wall,
                "mean_time_to_first_token_s": ttft.iter().sum::<f64>() / ttft.len().max(1) as f64, "p99_time_to_first_token_s": quantile(&ttft, 0.99)}));
        }
        self.step(format!("throughput: sustained {} requests/s for {} s", p.rate, p.duration_s));
        let sustained = self.sustained()?;
        Ok(json!({"sequential": sequential, "batch": batches, "concurrent": concurrent, "sustained": sustained}))
    }

    /// `n` requests submitted at once from `n` threads: the wall time and the responses.
    fn together(&self, n: usize, prompt: usize, new: usize, seed: u64) -> anyhow::Result<(f64, Vec<InferResponse>)> {
        together(n, |i| self.infer(prompt, new, seed + i as u64))
    }

    /// Requests at a fixed rate for a fixed time; latency percentiles per tenth of the run.
    fn sustained(&self) -> anyhow::Result<Value> {
        let p = self.plan;
        let count = ((p.rate * p.duration_s).round() as usize).clamp(1, 1024);
        let (prompt, new) = (100, p.sustained_new_tokens);
        let start = Instant::now();
        let samples: Vec<anyhow::Result<(f64, f64, f64, usize)>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..count)
                .map(|i| {
                    let at = Duration::from_secs_f64(i as f64 / p.rate);
                    scope.spawn(move || {
                        if let Some(wait) = at.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        let sent = start.elapsed().as_secs_f64();
                        let r = self.infer(prompt, new, 8000 + i as u64)?;
                        let latency = start.elapsed().as_secs_f64() - sent;
                        Ok((sent, latency, r.timings.queued_s + r.timings.time_to_first_token_s, r.token_ids.len()))
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a request thread panicked")))).collect()
        });
        let samples = samples.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let wall = start.elapsed().as_secs_f64();
        let window = (p.duration_s / 10.0).max(1e-3);
        let mut windows = Vec::new();
        for w in 0..10 {
            let (from, to) = (w as f64 * window, (w + 1) as f64 * window);
            let lat: Vec<f64> = samples.iter().filter(|s| s.0 >= from && (s.0 < to || w == 9)).map(|s| s.1).collect();
            if !lat.is_empty() {
                windows.push(json!({"from_s": (from * 1e3).round() / 1e3, "requests": lat.len(), "p50_latency_s": quantile(&lat, 0.5), "p99_latency_s": quantile(&lat, 0.99)}));
            }
        }
        let latency: Vec<f64> = samples.iter().map(|s| s.1).collect();
        let ttft: Vec<f64> = samples.iter().map(|s| s.2).collect();
        let generated: usize = samples.iter().map(|s| s.3).sum();
        Ok(json!({"rate_requests_per_s": p.rate, "duration_s": p.duration_s, "requests": count, "prompt_tokens": prompt, "new_tokens": new,
            "wall_s": wall, "output_tokens_per_s": generated as f64 / wall,
            "p50_latency_s": quantile(&latency, 0.5), "p99_latency_s": quantile(&latency, 0.99),
            "p50_time_to_first_token_s": quantile(&ttft, 0.5), "p99_time_to_first_token_s": quantile(&ttft, 0.99), "windows": windows}))
    }

    /// Loads the model as `v` says, measures it (a single request, concurrent requests
    /// sharing half their prompt, peak memory, the evaluation texts scored) and cleans up;
    /// the texts' scores come back for the divergence. A variant the plugin refuses or fails
    /// to load is reported as such, not measured.
    fn variant(&self, v: &Variant, texts: &[String]) -> anyhow::Result<(Value, Vec<ScoreResponse>)> {
        self.step(format!("optimization: {}", v.name));
        let update = ConfigUpdate { optimization: Some(v.settings.clone()), ..Default::default() };
        let outcome = self.plugin.update_config(&update).map_err(|e| anyhow::anyhow!("update_config: {e}"))?;
        if !outcome.refused.is_empty() {
            return Ok((json!({"variant": v.name, "refused": outcome.refused}), Vec::new()));
        }
        let watch = Watch::start(self.pid, self.nvml.clone());
        let options = LoadOptions { dtype: v.dtype, ..self.options.clone() };
        let info = match self.plugin.load_model(self.model_path, &options) {
            Ok(info) => info,
            Err(e) => return Ok((json!({"variant": v.name, "settings": v.settings, "load_error": e.to_string()}), Vec::new())),
        };
        let (h, vocab, ctx) = (info.handle, info.vocab_size, info.max_context as usize);
        let (prompt, new) = (100.min(ctx / 2), self.plan.new_tokens.min(ctx / 4).max(1));
        let measured = (|| -> anyhow::Result<(Value, Vec<ScoreResponse>)> {
            infer_on(self.plugin, h, vocab, 16.min(prompt), 4.min(new), 424_242)?;
            // Prompts sharing their first half: the single request primes it, the concurrent
            // ones can take it from the prefix cache.
            let shared = |prefix_seed: u64, tail_seed: u64| {
                let prefix = prompt_ids(prompt / 2, vocab, prefix_seed);
                move |i: usize| {
                    let mut ids = prefix.clone();
                    ids.extend(prompt_ids(prompt - prompt / 2, vocab, tail_seed + i as u64));
                    ids
                }
            };
            let n = self.plan.concurrency.first().copied().unwrap_or(4);
            // The whole measured sequence runs once untimed first, on prompts of its own (another
            // shared half, other tails: nothing it leaves in the prefix cache is measured), so
            // that every shape the timed runs meet is met before them: the full prefill, the
            // chunks after a prefix-cache hit, each decode width and MoE routing's expert
            // batches; on a GPU their kernels' first compilation and autotuning, and CUDA graph
            // captures. The first variant lost a third of its concurrent throughput to them in
            // the 2026-12-06 H100 run; a warm-up of fresh 100-token prompts, which never hit
            // the prefix cache, still left the 30B's baseline at 28 concurrent tokens/s against
            // 43 with graphs off (2026-12-06, the 30B peers call).
            let infer_ids = |ids: Vec<u32>| self.plugin.infer(h, &request(ids, new), &mut |_, _, _| true).map_err(|e| anyhow::anyhow!("{e}"));
            let warm = shared(31_338, 78_000);
            infer_ids(warm(0))?;
            together(n, |i| infer_ids(warm(i + 1)))?;
            let timed = shared(31_337, 40_000);
            let run = |i: usize| infer_ids(timed(i));
            let single = run(0)?.timings;
            let (wall, results) = together(n, |i| run(i + 1))?;
            let generated: usize = results.iter().map(|r| r.token_ids.len()).sum();
            let ttft: Vec<f64> = results.iter().map(|r| r.timings.time_to_first_token_s + r.timings.queued_s).collect();
            let score = |input: PromptInput| self.plugin.score(h, &ScoreRequest { input, return_logits: true }).map_err(|e| e.to_string());
            let scored: Result<Vec<ScoreResponse>, String> = texts.iter().map(|t| score(PromptInput::Text(t.clone()))).collect();
            // A model whose tokenizer gives ids past its own vocabulary (a test model) cannot
            // score the texts: it is evaluated on fixed random ids instead, and the report says so.
            let (scores, evaluated_on, score_error) = match scored {
                Ok(s) => (s, "the evaluation texts", None),
                Err(text_error) => {
                    let ids: Result<Vec<ScoreResponse>, String> = (0..texts.len().max(1)).map(|i| score(PromptInput::TokenIds(prompt_ids(64.min(ctx), vocab, 50_000 + i as u64)))).collect();
                    match ids {
                        Ok(s) => (s, "fixed random token ids (the texts did not score)", Some(text_error)),
                        Err(e) => (Vec::new(), "nothing", Some(format!("{text_error}; random ids: {e}"))),
                    }
                }
            };
            let (rss, gpu) = watch.peak();
            Ok((
                json!({
                    "evaluated_on": evaluated_on, "score_error": score_error,
                    "variant": v.name, "settings": v.settings, "dtype": info.dtype, "quantization": info.quantization,
                    "weight_bytes": info.weight_bytes, "kv_cache_bytes": info.kv_cache_bytes,
                    "time_to_first_token_s": single.time_to_first_token_s, "decode_tokens_per_s": single.decode_tokens_per_s,
                    "concurrent_requests": n, "concurrent_output_tokens_per_s": generated as f64 / wall,
                    "concurrent_mean_time_to_first_token_s": ttft.iter().sum::<f64>() / ttft.len().max(1) as f64,
                    "peak_resident_bytes": rss, "peak_gpu_bytes": gpu, "perplexity": pooled_perplexity(&scores),
                }),
                scores,
            ))
        })();
        self.plugin.cleanup(h).map_err(|e| anyhow::anyhow!("cleanup: {e}"))?;
        measured
    }

    /// Runs `variants` in order (the first is the reference the others' divergence is taken
    /// from), then puts the settings in force back. Where the first does not run (a model too
    /// large for f32 on its device: Qwen3-Coder-30B needs 122 GB), the first variant that does
    /// is the reference for the ones after it, and each compared row names its reference
    /// (`divergence_reference`).
    fn variants(&self, variants: &[Variant], baseline: &OptimizationSettings) -> anyhow::Result<Vec<Value>> {
        let texts = eval_texts();
        let mut divergences = Divergences::default();
        let mut rows = Vec::new();
        for v in variants {
            let (row, scores) = self.variant(v, &texts)?;
            rows.push(divergences.add(&v.name, row, scores));
        }
        self.plugin
            .update_config(&ConfigUpdate { optimization: Some(baseline.clone()), ..Default::default() })
            .map_err(|e| anyhow::anyhow!("update_config: {e}"))?;
        Ok(rows)
    }

    fn power(&self, pid: u32, gpu: Option<&GpuPower>) -> anyhow::Result<Value> {
        let p = self.plan;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // One phase: wall time, CPU seconds of the model's process, GPU power samples and
        // energy, RAPL energy.
        let phase = |work: &dyn Fn() -> anyhow::Result<usize>| -> anyhow::Result<Value> {
            let (cpu0, rapl0, gpu_e0) = (cpu_seconds(pid), rapl_uj(), gpu.and_then(GpuPower::energy_j));
            let watts = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let start = Instant::now();
            let tokens = std::thread::scope(|scope| {
                if let Some(g) = gpu {
                    let (w, s) = (watts.clone(), stop.clone());
                    scope.spawn(move || {
                        while !s.load(Ordering::Relaxed) {
                            if let (Some(x), Ok(mut v)) = (g.watts(), w.lock()) {
                                v.push(x);
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    });
                }
                let out = work();
                stop.store(true, Ordering::Relaxed);
                out
            })?;
            let wall = start.elapsed().as_secs_f64();
            let cpu = cpu0.zip(cpu_seconds(pid)).map(|(a, b)| b - a);
            let rapl_j = rapl0.zip(rapl_uj()).map(|((a, range), (b, _))| (if b >= a { b - a } else { b + range - a }) as f64 / 1e6);
            let gpu_j = gpu_e0.zip(gpu.and_then(GpuPower::energy_j)).map(|(a, b)| b - a);
            let w = watts.lock().map(|v| v.clone()).unwrap_or_default();
            let joules = gpu_j.or(rapl_j);
            Ok(json!({
                "wall_s": wall, "generated_tokens": tokens,
                "cpu_utilisation_percent": cpu.map(|c| c / wall / cores * 100.0), "cpu_cores_busy": cpu.map(|c| c / wall),
                "gpu_mean_watts": (!w.is_empty()).then(|| w.iter().sum::<f64>() / w.len() as f64),
                "gpu_energy_j": gpu_j, "cpu_package_energy_j": rapl_j,
                "tokens_per_joule": joules.filter(|&j| j > 0.0 && tokens > 0).map(|j| tokens as f64 / j),
                "energy_source": if gpu_j.is_some() { "GPU (NVML)" } else if rapl_j.is_some() { "CPU package (RAPL)" } else { "none readable" },
            }))
        };
        self.step("power: idle".into());
        let idle = phase(&|| {
            std::thread::sleep(Duration::from_secs_f64(p.idle_s));
            Ok(0)
        })?;
        self.step("power: generating".into());
        let new = p.generation_lengths.iter().copied().max().unwrap_or(p.new_tokens);
        // Requests one after another for at least as long as the idle phase: CPU time is read
        // in clock ticks (10 ms), too coarse for one short request of a small model.
        let busy = phase(&|| {
            let (start, mut tokens, mut seed) = (Instant::now(), 0, 9000);
            while tokens == 0 || start.elapsed().as_secs_f64() < p.idle_s {
                tokens += self.infer(100.min(self.info.max_context as usize / 2), new.min(self.info.max_context as usize / 2), seed)?.token_ids.len();
                seed += 1;
            }
            Ok(tokens)
        })?;
        Ok(json!({"idle": idle, "generating": busy, "cores": cores}))
    }
}

/// The machine: CPU, cores, memory, kernel, and the GPUs NVML sees.
fn machine(nvml: Option<&nvml_wrapper::Nvml>) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1))).map(str::trim).unwrap_or("unknown");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let gpus: Vec<Value> = nvml
        .map(|n| {
            (0..n.device_count().unwrap_or(0))
                .filter_map(|i| {
                    let d = n.device_by_index(i).ok()?;
                    Some(json!({"index": i, "name": d.name().ok(), "memory_bytes": d.memory_info().ok().map(|m| m.total)}))
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu, "cores": std::thread::available_parallelism().map_or(1, |n| n.get()), "memory_bytes": mem_kb * 1024,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "gpus": gpus, "driver": nvml.and_then(|n| n.sys_driver_version().ok()),
    })
}

/// The commit of the checkout the command runs in (`INFERENCE_PIO_COMMIT` when set, for
/// binaries carried elsewhere), else `unknown`.
fn commit() -> String {
    if let Ok(c) = std::env::var("INFERENCE_PIO_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's civil-from-days).
pub fn utc_timestamp(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// What `inference-pio bench` was given.
pub struct BenchArgs<'a> {
    pub model: Option<&'a Path>,
    /// Further models whose memory stages join the memory suite's table, each through the
    /// plugin its `config.json` (or GGUF file) names.
    pub memory_models: &'a [PathBuf],
    /// A transformers reference (`NAME.reference.json`) the accuracy suite compares with.
    pub reference: Option<&'a Path>,
    pub plugin: Option<&'a str>,
    pub device: Option<DeviceRequest>,
    pub dtype: Option<DType>,
    pub random_weights: Option<u64>,
    pub out: PathBuf,
    pub plan: Plan,
}

/// A transformers reference as the plugins' fixture scripts write it (`NAME.reference.json`):
/// prompts of token ids, each with the last position's logits (inline as `logits`, or in a
/// little-endian f32 file `last_logits_file` beside the JSON) and its greedy continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub source: String,
    pub prompts: Vec<ReferencePrompt>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReferencePrompt {
    pub ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

/// Reads a [`Reference`]; errors name the file and what is missing.
pub fn read_reference(path: &Path) -> anyhow::Result<Reference> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the reference {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("the reference {} is not JSON", path.display()))?;
    let bad = |what: String| anyhow::anyhow!("the reference {}: {what}", path.display());
    let ids = |v: &Value, key: &str, i: usize| -> anyhow::Result<Vec<u32>> {
        v[key].as_array().ok_or_else(|| bad(format!("prompt {i} has no `{key}` list")))?.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(format!("prompt {i}: `{key}` holds a value that is not a token id")))).collect()
    };
    let prompts = json["prompts"].as_array().filter(|p| !p.is_empty()).ok_or_else(|| bad("no `prompts`".into()))?;
    let prompts = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let last_logits: Vec<f32> = match (p["logits"].as_array(), p["last_logits_file"].as_str()) {
                (Some(rows), _) => rows.last().and_then(Value::as_array).ok_or_else(|| bad(format!("prompt {i}: `logits` holds no rows")))?.iter().map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| bad(format!("prompt {i}: a logit that is not a number")))).collect::<anyhow::Result<_>>()?,
                (None, Some(file)) => {
                    let file = path.parent().unwrap_or(Path::new(".")).join(file);
                    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
                    if bytes.len() % 4 != 0 {
                        return Err(bad(format!("{} is not whole f32 values", file.display())));
                    }
                    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                }
                (None, None) => return Err(bad(format!("prompt {i} has neither `logits` nor `last_logits_file`"))),
            };
            Ok(ReferencePrompt { ids: ids(p, "ids", i)?, last_logits, greedy: ids(p, "greedy", i)? })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Reference { source: json["source"].as_str().unwrap_or("unnamed").to_string(), prompts })
}

/// `‖a - b‖ / ‖b‖`.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let (diff, norm) = a.iter().zip(b).fold((0f64, 0f64), |(d, n), (&x, &y)| (d + f64::from(x - y).powi(2), n + f64::from(y).powi(2)));
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// The memory suite's stages as JSON, its leak check (growth from the first cycle's cleanup
/// to the second's beyond max(64 MiB, a tenth of the weights)), and whether that passed.
fn memory_stages(memory: &[(String, u64, u64)], weight_bytes: u64) -> (Value, Value, bool) {
    let stages = memory.iter().map(|(name, rss, gpu)| json!({"stage": name, "resident_bytes": rss, "gpu_bytes": gpu})).collect::<Vec<_>>();
    let (first, second) = match memory {
        [.., a, b] => (a, b),
        _ => return (Value::Array(stages), json!({"passed": true}), true),
    };
    let floor = LEAK_FLOOR_BYTES.max(weight_bytes / 10);
    let rss_growth = second.1.saturating_sub(first.1);
    let gpu_growth = second.2.saturating_sub(first.2);
    let leaked = rss_growth > floor || gpu_growth > floor;
    (Value::Array(stages), json!({"resident_growth_bytes": rss_growth, "gpu_growth_bytes": gpu_growth, "allowed_bytes": floor, "passed": !leaked}), !leaked)
}

/// One plugin's row of the memory table: resident and GPU bytes after load, at the peak,
/// after cleanup and after a second load/cleanup cycle.
fn plugin_memory_row(plugin: &str, model: &Path, process: &str, memory: &[(String, u64, u64)], weight_bytes: u64, passed: bool) -> Value {
    let at = |stage: &str| memory.iter().find(|(name, ..)| name == stage).map(|&(_, rss, gpu)| (rss, gpu));
    let mut row = json!({"plugin": plugin, "model": model.display().to_string(), "process": process, "weight_bytes": weight_bytes, "leak_check_passed": passed});
    for (stage, key) in [("baseline", "baseline"), ("after load_model", "after_load"), ("peak", "peak"), ("after cleanup", "after_cleanup"), ("after a second cycle", "after_second_cycle")] {
        if let Some((rss, gpu)) = at(stage) {
            row[format!("{key}_resident_bytes")] = json!(rss);
            row[format!("{key}_gpu_bytes")] = json!(gpu);
        }
    }
    row
}

/// A model's plugin, opened and initialized for it.
struct Opened {
    model_path: PathBuf,
    selected: crate::selection::Selected,
    settings: inference_pio_core::types::PluginSettings,
    /// The process that holds the model: a worker at `high`/`maximum`, else this one.
    pid: u32,
}

/// Resolves `model`, picks its plugin (`plugin`, or by its config), and initializes it with
/// the config file's settings for it.
fn open_model(host: &Host, model: Option<&Path>, plugin: Option<&str>) -> anyhow::Result<Opened> {
    let model_path = host.resolve_model(model, true)?;
    let model_config = read_model_config(&model_path)?;
    let open = |id: &str, path: &Path| host.open_plugin(id, path, Some(&model_path));
    let selected = select(&host.discovery, &model_config, plugin, &open)?;
    let security = host.config.plugin(&selected.id).security.unwrap_or_default();
    let settings = host.settings(&selected.id, security, &selected.path, &model_path);
    selected.plugin.initialize(&settings).with_context(|| format!("plugin `{}` failed to initialize", selected.id))?;
    let self_pid = std::process::id();
    let pid = match &selected.plugin {
        PluginHandle::Worker(w) => w.worker_pid().unwrap_or(self_pid),
        PluginHandle::InProcess(_) => self_pid,
    };
    Ok(Opened { model_path, selected, settings, pid })
}

/// The memory suite alone on `model` through the plugin its config names (a further row of
/// the table): the stages, a request, cleanup and a second cycle, as for the benchmarked
/// model; the plugin is closed afterwards (a worker ends).
fn memory_of_model(host: &Host, model: &Path, options: &LoadOptions, nvml: Option<Arc<nvml_wrapper::Nvml>>) -> anyhow::Result<(Value, bool)> {
    let self_pid = std::process::id();
    let mut memory = Vec::new();
    let stage = |memory: &mut Vec<(String, u64, u64)>, name: &str, pid: u32| {
        let (rss, gpu) = sample(pid, nvml.as_deref());
        memory.push((name.to_string(), rss, gpu));
    };
    stage(&mut memory, "baseline", self_pid);
    let Opened { model_path, selected, pid, .. } = open_model(host, Some(model), None)?;
    let plugin = &selected.plugin;
    let load = || plugin.load_model(&model_path, options).with_context(|| format!("plugin `{}` could not load {}", selected.id, model_path.display()));
    let cycle = |memory: &mut Vec<(String, u64, u64)>, first: bool| -> anyhow::Result<u64> {
        let watch = first.then(|| Watch::start(pid, nvml.clone()));
        let info = load()?;
        if first {
            stage(memory, "after load_model", pid);
        }
        let (prompt, new) = (100.min(info.max_context as usize / 2), 16.min(info.max_context as usize / 2));
        infer_on(plugin, info.handle, info.vocab_size, prompt, new, 4242)?;
        if let Some(watch) = watch {
            let (rss, gpu) = watch.peak();
            memory.push(("peak".into(), rss, gpu));
        }
        plugin.cleanup(info.handle).map_err(|e| anyhow::anyhow!("cleanup: {e}"))?;
        stage(memory, if first { "after cleanup" } else { "after a second cycle" }, pid);
        Ok(info.weight_bytes)
    };
    let weight_bytes = cycle(&mut memory, true)?;
    cycle(&mut memory, false)?;
    let process = if pid == self_pid { "host (in process)" } else { "worker" };
    let (_, _, passed) = memory_stages(&memory, weight_bytes);
    Ok((plugin_memory_row(&selected.id, &model_path, process, &memory, weight_bytes, passed), passed))
}

/// Runs the planned suites and writes the report; an error when the run could not be made,
/// `Ok(false)` when it was made and a check in it failed (a memory leak).
pub fn run(host: &Host, args: &BenchArgs<'_>) -> anyhow::Result<bool> {
    let plan = &args.plan;
    if !args.memory_models.is_empty() && !plan.has(Suite::Memory) {
        anyhow::bail!("--memory-model adds rows to the memory suite's table: run it with --suite memory (or all)");
    }
    let reference = match args.reference {
        Some(_) if !plan.has(Suite::Accuracy) => anyhow::bail!("--reference is compared by the accuracy suite: run it with --suite accuracy (or all)"),
        Some(path) => Some(read_reference(path)?),
        None => None,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create the report directory {}", args.out.display()))?;
    let nvml = nvml_wrapper::Nvml::init().ok().map(Arc::new);
    let mut memory = Vec::new();
    let self_pid = std::process::id();
    let stage = |memory: &mut Vec<(String, u64, u64)>, name: &str, pid: u32| {
        let (rss, gpu) = sample(pid, nvml.as_deref());
        memory.push((name.to_string(), rss, gpu));
    };
    stage(&mut memory, "baseline", self_pid);
    let Opened { model_path, selected, settings, pid } = open_model(host, args.model, args.plugin)?;
    let plugin = &selected.plugin;
    let metadata = plugin.metadata().map_err(|e| anyhow::anyhow!("{e}"))?;
    stage(&mut memory, "after initialize", pid);
    let device = match args.device {
        Some(d) => d,
        None => host.config.host.device.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?.unwrap_or(DeviceRequest::Auto),
    };
    let options = LoadOptions { device, dtype: args.dtype, random_weights: args.random_weights };
    let load = || plugin.load_model(&model_path, &options).with_context(|| format!("plugin `{}` could not load {}", selected.id, model_path.display()));
    let info = load()?;
    stage(&mut memory, "after load_model", pid);
    let watch = Watch::start(pid, nvml.clone());
    let all_variants = variants(&settings.optimization, args.dtype, &metadata.optimizations, !info.quantization.is_empty(), info.device == "cpu");
    let steps = plan.suites.iter().map(|s| match s {
        Suite::Speed => 1 + (plan.runs + 1) * (plan.prompt_lengths.len() + plan.generation_lengths.len()),
        Suite::Throughput => 2 + plan.batch_sizes.len() + plan.concurrency.len(),
        Suite::Memory => 3 + args.memory_models.len(),
        Suite::Power => 2,
        Suite::Optimization => all_variants.len(),
        Suite::Accuracy if plan.has(Suite::Optimization) => usize::from(args.reference.is_some()),
        Suite::Accuracy => 2 + usize::from(args.reference.is_some()),
    });
    let bar = indicatif::ProgressBar::new(steps.sum::<usize>() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let bench = Bench { plugin, handle: info.handle, info: info.clone(), plan, bar, model_path: &model_path, options: options.clone(), pid, nvml: nvml.clone() };
    let gpu_index = info.device.strip_prefix("cuda:").and_then(|i| i.parse().ok()).or_else(|| (info.device == "cuda").then_some(0));
    let gpu = nvml.clone().zip(gpu_index).map(|(nvml, index)| GpuPower { nvml, index });
    let mut suites = serde_json::Map::new();
    let started = Instant::now();
    if plan.has(Suite::Speed) {
        suites.insert("speed".into(), bench.speed()?);
    }
    if plan.has(Suite::Throughput) {
        suites.insert("throughput".into(), bench.throughput()?);
    }
    if plan.has(Suite::Power) {
        suites.insert("power".into(), bench.power(pid, gpu.as_ref())?);
    }
    // The loaded model against a transformers reference: each prompt's last logits and greedy tokens.
    let against_reference = match &reference {
        Some(r) => {
            bench.step("accuracy: against the transformers reference".into());
            let mut rows = Vec::new();
            for (i, p) in r.prompts.iter().enumerate() {
                let scored = plugin.score(info.handle, &ScoreRequest { input: PromptInput::TokenIds(p.ids.clone()), return_logits: true }).map_err(|e| anyhow::anyhow!("reference prompt {i}: {e}"))?;
                let last = scored.logits.as_ref().and_then(|l| l.last()).ok_or_else(|| anyhow::anyhow!("reference prompt {i}: the plugin returned no logits"))?;
                let generated = plugin.infer(info.handle, &request(p.ids.clone(), p.greedy.len()), &mut |_, _, _| true).map_err(|e| anyhow::anyhow!("reference prompt {i}: {e}"))?;
                let same = generated.token_ids.iter().zip(&p.greedy).take_while(|(a, b)| a == b).count();
                rows.push(json!({
                    "prompt_tokens": p.ids.len(), "vocabulary": last.len(), "reference_vocabulary": p.last_logits.len(),
                    "last_logits_relative_l2": (last.len() == p.last_logits.len()).then(|| relative_l2(last, &p.last_logits)),
                    "greedy_tokens": p.greedy.len(), "greedy_tokens_matching": same,
                }));
            }
            let worst = rows.iter().filter_map(|r| r["last_logits_relative_l2"].as_f64()).fold(0f64, f64::max);
            let all_greedy = rows.iter().all(|r| r["greedy_tokens_matching"] == r["greedy_tokens"]);
            Some(json!({
                "file": args.reference.map(|p| p.display().to_string()), "source": r.source, "prompts": rows,
                "largest_last_logits_relative_l2": worst, "greedy_identical": all_greedy, "dtype": info.dtype,
                "note": "the product's own bound is 1e-4 relative L2 in f32 with identical greedy tokens; other dtypes and quantized weights differ by their rounding",
            }))
        }
        None => None,
    };
    let mut passed = true;
    if plan.has(Suite::Memory) {
        // A short workflow of its own, so that the peak is a full request's even alone.
        bench.step("memory: a full request".into());
        bench.infer(100.min(info.max_context as usize / 2), 16.min(info.max_context as usize / 2), 4242)?;
        let (rss, gpu_bytes) = watch.peak();
        memory.push(("peak".into(), rss, gpu_bytes));
        bench.step("memory: cleanup".into());
        plugin.cleanup(info.handle).map_err(|e| anyhow::anyhow!("cleanup: {e}"))?;
        stage(&mut memory, "after cleanup", pid);
        // A second cycle: what stays after it beyond the first cycle's is a leak.
        bench.step("memory: a second load/cleanup cycle".into());
        let again = load()?;
        infer_on(plugin, again.handle, info.vocab_size, 100.min(info.max_context as usize / 2), 16.min(info.max_context as usize / 2), 4242)?;
        plugin.cleanup(again.handle).map_err(|e| anyhow::anyhow!("cleanup: {e}"))?;
        stage(&mut memory, "after a second cycle", pid);
        let process = if pid == self_pid { "host (in process)" } else { "worker" };
        let (stages, leak_check, ok) = memory_stages(&memory, info.weight_bytes);
        passed &= ok;
        // One row per plugin: this one's, then each further model's through its own plugin.
        let mut plugins = vec![plugin_memory_row(&selected.id, &model_path, process, &memory, info.weight_bytes, ok)];
        for extra in args.memory_models {
            bench.step(format!("memory: {}", extra.display()));
            let (row, ok) = memory_of_model(host, extra, &options, nvml.clone())?;
            passed &= ok;
            plugins.push(row);
        }
        suites.insert(
            "memory".into(),
            json!({
                "process": process, "stages": stages, "leak_check": leak_check, "gpu_memory_readable": nvml.is_some(), "plugins": plugins,
            }),
        );
    } else {
        plugin.cleanup(info.handle).map_err(|e| anyhow::anyhow!("cleanup: {e}"))?;
    }
    // Variants: each loads the model its own way, measures it and cleans up.
    let texts = eval_texts().len();
    let accuracy = |rows: &[Value]| {
        json!({
            "transformers_reference": against_reference,
            "most_exact": rows.first().map(|r| r["variant"].clone()), "chosen": rows.get(1).map(|r| r["variant"].clone()),
            "divergence_of_chosen": rows.get(1).map(|r| r["divergence_from_most_exact"].clone()),
            "perplexity_chosen": rows.get(1).map(|r| r["perplexity"].clone()), "perplexity_most_exact": rows.first().map(|r| r["perplexity"].clone()),
            "texts": texts,
            "note": "the chosen settings against the same model in f32 with every weight dequantized, over the committed evaluation texts; \
                     with --reference, the loaded model against a transformers reference (the plugins' fixtures)",
        })
    };
    if plan.has(Suite::Optimization) {
        let rows = bench.variants(&all_variants, &settings.optimization)?;
        if plan.has(Suite::Accuracy) {
            suites.insert("accuracy".into(), accuracy(&rows));
        }
        suites.insert(
            "optimization".into(),
            json!({
                "variants": rows, "reported_settings": metadata.optimizations, "texts": texts,
                "built_in": BUILT_IN.iter().map(|(what, why)| json!({"optimization": what, "why_not_switched": why})).collect::<Vec<_>>(),
            }),
        );
    } else if plan.has(Suite::Accuracy) {
        let rows = bench.variants(&all_variants[..2], &settings.optimization)?;
        suites.insert("accuracy".into(), accuracy(&rows));
    }
    bench.bar.finish_and_clear();
    drop(watch);
    let report = json!({
        "tool": "inference-pio bench", "version": env!("CARGO_PKG_VERSION"),
        "date": utc_timestamp(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())),
        "commit": commit(), "command": std::env::args().collect::<Vec<_>>().join(" "), "machine": machine(nvml.as_deref()),
        "plugin": {"id": selected.id, "version": metadata.version, "path": selected.path, "security": settings.security},
        "model": {"path": model_path, "info": info}, "load_options": options, "settings": settings.optimization, "plan": plan,
        "wall_s": started.elapsed().as_secs_f64(), "passed": passed, "suites": suites,
    });
    let json_path = args.out.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", json_path.display()))?;
    let html_path = args.out.join("report.html");
    std::fs::write(&html_path, crate::bench_report::html(&report)).with_context(|| format!("cannot write {}", html_path.display()))?;
    eprintln!("wrote {} and {}", json_path.display(), html_path.display());
    Ok(passed)
}

/// Growth of resident or GPU memory from one load/cleanup cycle to the next that is called a
/// leak: at least this many bytes (or a tenth of the weights, if more).
pub const LEAK_FLOOR_BYTES: u64 = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergences_are_taken_from_the_first_variant_that_scored() {
        let scored = |logits: Vec<Vec<f32>>| vec![ScoreResponse { token_ids: vec![1, 2], perplexity: None, mean_nll: None, logits: Some(logits) }];
        let exact = scored(vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]]);
        let near = scored(vec![vec![1.0, 0.1, 0.0], vec![0.0, 1.0, 0.1]]);
        // The most exact variant ran: everyone after it is compared with it.
        let mut d = Divergences::default();
        assert!(d.add("exact", json!({}), exact.clone())["divergence_from_most_exact"].is_null());
        let row = d.add("baseline", json!({}), near.clone());
        assert_eq!(row["divergence_reference"], "exact");
        assert!(row["divergence_from_most_exact"]["mean_kl"].as_f64().is_some_and(|kl| kl > 0.0));
        let same = d.add("same", json!({}), exact.clone());
        assert_eq!(same["divergence_from_most_exact"]["mean_kl"].as_f64(), Some(0.0));
        // It did not load: the baseline is the reference, and both rows say so.
        let mut d = Divergences::default();
        let failed = d.add("exact", json!({"load_error": "the weights need 122 GB in f32"}), Vec::new());
        assert!(failed["divergence_from_most_exact"].is_null());
        let base = d.add("baseline", json!({}), near.clone());
        let why = base["divergence_from_most_exact"]["error"].as_str().unwrap_or_default();
        assert!(why.contains("did not run") && why.contains("122 GB"), "{why}");
        let int8 = d.add("int8", json!({}), exact);
        assert_eq!(int8["divergence_reference"], "baseline");
        assert!(int8["divergence_from_most_exact"]["mean_kl"].as_f64().is_some_and(|kl| kl > 0.0));
        assert_eq!(d.add("refused", json!({"refused": ["x"]}), Vec::new())["divergence_reference"], Value::Null);
    }

    #[test]
    fn suites_parse_and_unknown_ones_are_refused_by_name() {
        assert_eq!(parse_suites("all").expect("all"), Suite::ALL.to_vec());
        assert_eq!(parse_suites("memory").expect("memory"), vec![Suite::Memory]);
        assert_eq!(parse_suites("accuracy").expect("accuracy"), vec![Suite::Accuracy]);
        assert!(parse_suites("spede").expect_err("unknown").contains("unknown suite `spede`"));
    }

    #[test]
    fn variants_switch_off_what_the_plugin_reports_and_the_baseline_has_on() {
        let keys: Vec<String> = OptimizationSettings::KEYS.iter().map(|k| k.to_string()).collect();
        let baseline = OptimizationSettings::default();
        let v = variants(&baseline, None, &keys, false, false);
        let names: Vec<&str> = v.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "most exact (f32, weights dequantized)",
                "baseline",
                "CUDA graphs off",
                "async scheduling off",
                "prefix caching off",
                "chunked prefill off",
                "int8 weights",
                "int4 weights",
                "fp8 weights",
                "int8 KV cache",
                "all switches off"
            ]
        );
        assert_eq!(v[8].settings, OptimizationSettings { quantization: Some(Quantization::Fp8), ..baseline.clone() });
        assert_eq!(v[9].settings, OptimizationSettings { kv_cache_dtype: KvCacheDtype::Int8, ..baseline.clone() });
        assert_eq!((v[0].dtype, v[0].settings.quantization), (Some(DType::F32), Some(Quantization::None)));
        assert_eq!(v[1].settings, baseline);
        // Each switch changes exactly its own key.
        assert_eq!(v[4].settings, OptimizationSettings { prefix_caching: false, ..baseline.clone() });
        let all = &v[10].settings;
        assert!(!all.cuda_graphs && !all.async_scheduling && !all.prefix_caching && all.prefill_chunk_tokens == Some(0));
        // A plugin reporting only prefix caching gets that switch alone, no "all off", and a
        // quantized checkpoint adds its dequantized variant.
        let v = variants(&baseline, Some(DType::Bf16), &["prefix_caching".to_string()], true, true);
        let names: Vec<&str> = v.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["most exact (f32, weights dequantized)", "baseline", "prefix caching off"]);
        assert_eq!(v[2].dtype, Some(DType::Bf16));
        let v = variants(&baseline, None, &keys, true, false);
        assert!(v.iter().any(|v| v.settings.quantization == Some(Quantization::None) && v.name.contains("dequantized") && v.dtype.is_none()));
        assert_eq!(v[0].settings.quant_activations, Some(QuantActivations::Exact));
        // On the CPU the quantized products' 8-bit activations are a variant too (CUDA refuses them).
        let v = variants(&baseline, None, &keys, true, true);
        let int8 = v.iter().find(|v| v.name.starts_with("8-bit activations")).expect("an 8-bit activations variant");
        assert_eq!(int8.settings, OptimizationSettings { quant_activations: Some(QuantActivations::Int8), ..baseline.clone() });
    }

    #[test]
    fn references_read_inline_and_filed_logits_and_name_what_is_missing() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a.last.f32"), [1.0f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).expect("f32 file");
        let path = dir.path().join("a.reference.json");
        let json = r#"{"source": "transformers 5", "prompts": [
            {"ids": [1, 2], "logits": [[0.5, 0.25, 0.0]], "greedy": [3, 4]},
            {"ids": [5], "last_logits_file": "a.last.f32", "greedy": [6]}]}"#;
        std::fs::write(&path, json).expect("json");
        let r = read_reference(&path).expect("reads");
        assert_eq!(r.source, "transformers 5");
        assert_eq!(r.prompts[0], ReferencePrompt { ids: vec![1, 2], last_logits: vec![0.5, 0.25, 0.0], greedy: vec![3, 4] });
        assert_eq!(r.prompts[1].last_logits, vec![1.0, -2.0]);
        std::fs::write(&path, r#"{"prompts": [{"ids": [1], "greedy": [2]}]}"#).expect("json");
        let e = read_reference(&path).expect_err("no logits").to_string();
        assert!(e.contains("prompt 0 has neither `logits` nor `last_logits_file`"), "{e}");
        std::fs::write(&path, r#"{"prompts": [{"ids": [-1], "logits": [[0]], "greedy": []}]}"#).expect("json");
        assert!(read_reference(&path).expect_err("bad id").to_string().contains("not a token id"));
        assert!((relative_l2(&[1.0, 1.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert_eq!(relative_l2(&[3.0], &[3.0]), 0.0);
    }

    fn scored(ids: Vec<u32>, nll: Option<f64>, logits: Vec<Vec<f32>>) -> ScoreResponse {
        ScoreResponse { token_ids: ids, perplexity: nll.map(f64::exp), mean_nll: nll, logits: Some(logits) }
    }

    #[test]
    fn perplexity_pools_every_predicted_token_and_divergence_needs_the_same_tokens() {
        // 3 predicted tokens at 1.0 nats and 1 at 2.0: exp(5/4).
        let a = [scored(vec![1, 2, 3, 4], Some(1.0), vec![vec![1.0, 0.0]; 4]), scored(vec![5, 6], Some(2.0), vec![vec![0.0, 1.0]; 2])];
        assert!((pooled_perplexity(&a).expect("some") - (1.25f64).exp()).abs() < 1e-12);
        assert_eq!(pooled_perplexity(&[]), None);
        let same = texts_divergence(&a, &a).expect("divergence");
        assert_eq!((same.positions, same.mean_kl, same.top1_agreement), (6, 0.0, 1.0));
        // One text's picks flipped: 4 of 6 positions agree.
        let b = [a[0].clone(), scored(vec![5, 6], Some(2.0), vec![vec![1.0, 0.0]; 2])];
        let d = texts_divergence(&a, &b).expect("divergence");
        assert!((d.top1_agreement - 4.0 / 6.0).abs() < 1e-12 && d.mean_kl > 0.0, "{d:?}");
        let other_tokens = [a[0].clone(), scored(vec![5, 7], Some(2.0), vec![vec![0.0, 1.0]; 2])];
        assert!(texts_divergence(&a, &other_tokens).expect_err("different tokens").contains("tokenized differently"));
        assert!(texts_divergence(&a, &a[..1]).is_err());
    }

    #[test]
    fn the_evaluation_texts_are_committed() {
        let texts = eval_texts();
        assert_eq!(texts.len(), 4);
        assert!(texts.iter().all(|t| t.len() > 100));
    }

    #[test]
    fn prompt_ids_are_deterministic_and_inside_the_vocabulary() {
        let a = prompt_ids(500, 1000, 7);
        assert_eq!(a, prompt_ids(500, 1000, 7));
        assert_ne!(a, prompt_ids(500, 1000, 8));
        assert!(a.iter().all(|&id| (125..875).contains(&id)), "{a:?}");
        // A tiny vocabulary still gets ids.
        assert!(prompt_ids(10, 4, 1).iter().all(|&id| id < 4));
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let xs = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&xs, 0.5), 3.0);
        assert_eq!(quantile(&xs, 0.99), 5.0);
        assert_eq!(quantile(&xs, 0.0), 1.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_796_469_296), "2026-12-05T11:14:56Z");
    }

    #[test]
    fn the_cpu_time_of_this_process_is_read_from_proc() {
        let before = cpu_seconds(std::process::id()).expect("readable");
        // Busy work until 50 ms of CPU time show (several 10 ms clock ticks), or 10 s of wall
        // time on a machine too loaded to schedule this thread (then the reading is wrong).
        let start = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.05 && start.elapsed() < Duration::from_secs(10) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
            after = cpu_seconds(std::process::id()).expect("readable");
        }
        assert!(after - before >= 0.05, "CPU time {before} -> {after} s over {:?} of busy work", start.elapsed());
    }
}
