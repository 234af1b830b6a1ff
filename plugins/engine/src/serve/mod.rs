//! The serving core: one step loop per loaded model, on its own thread, stepping every live
//! request together over a paged KV cache (vLLM v1's `EngineCore`; SGLang's and mistral.rs's
//! schedulers are the same design).
//!
//! Callers on any thread submit a request and get its events (tokens with their text, then
//! the result) on a channel; the loop admits requests, asks the [`scheduler`] for a step,
//! builds the step's flat batch ([`runner`]), runs the decoder once, samples each sequence
//! with its own parameters ([`output`]) and sends the tokens. A caller whose consumer stops
//! sets the request's cancel flag, and the loop frees the sequence's blocks at its next step.
//! `run`, `--batch`, `score` and the parity tests all go through here.
//!
//! Async scheduling (vLLM v1's `async_scheduling`): a step whose rows are all greedy decode
//! rows picks its tokens on the device and is left in flight; the loop schedules the next step
//! with placeholder tokens and, when it continues the same rows, queues it with its tokens
//! gathered from the picks on the device, and only then reads back, detokenises and streams the
//! step before, while the GPU runs the new one. Any other step first reads back the one in
//! flight. The tokens are the same either way (`async_scheduling = false` turns it off).

pub mod block_pool;
pub mod graph;
pub mod output;
pub mod ranks;
pub mod runner;
pub mod scheduler;
pub mod vision_graph;

use crate::decoder::{KvPool, StepVision};
use crate::error::EngineError;
use crate::multimodal::PromptMedia;
use crate::vision::ImageFeatures;
use burn::tensor::{Int, Tensor, TensorData};
use crate::generate::{Model, RowRequest, RowResult};
use block_pool::BlockPool;
use inference_pio_core::config::OptimizationSettings;
use inference_pio_core::types::{FinishReason, SchedulerStats, Timings, TokenDetail};
use output::Output;
use scheduler::{Limits, Scheduled, Scheduler, SeqState};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// What a request asks of the loop.
pub enum Work {
    Generate(RowRequest),
    /// Logits at every prompt position (no generation, no prefix reuse).
    Score { ids: Vec<u32>, media: Option<Arc<PromptMedia>> },
}

/// One request handed to the loop.
pub struct Submission {
    pub work: Work,
    /// Prompt tokens per step at most (0: the whole prompt in one step).
    pub chunk: usize,
    /// Keys the prefix cache separates requests by (a tenant's salt).
    pub salt: Vec<u8>,
    /// Where the request's events go, tagged with `tag`.
    pub events: Sender<(usize, Event)>,
    pub tag: usize,
    pub cancel: Arc<AtomicBool>,
}

/// What a request is told.
pub enum Event {
    /// A new token, the text that may be streamed with it, and what else it carries.
    Token { id: u32, text: String, detail: TokenDetail },
    /// The end: the result, or why the request failed.
    Done(Box<Result<Finished, EngineError>>),
}

/// A request's result.
pub struct Finished {
    pub result: RowResult,
    /// Scoring: the f32 logits of every prompt position.
    pub logits: Vec<Vec<f32>>,
    pub timings: Timings,
    /// When the request was submitted, got its first token, and each token after.
    pub submitted: Instant,
    pub token_times: Vec<Instant>,
}

/// The loop's settings that may change while it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepSettings {
    limits: Limits,
    prefix_caching: bool,
    cuda_graphs: bool,
    async_scheduling: bool,
}

impl StepSettings {
    fn of(settings: &OptimizationSettings) -> Self {
        Self {
            limits: Limits { max_num_seqs: settings.max_num_seqs as usize, max_num_batched_tokens: settings.max_num_batched_tokens as usize },
            prefix_caching: settings.prefix_caching,
            cuda_graphs: settings.cuda_graphs,
            async_scheduling: settings.async_scheduling,
        }
    }
}

/// A model's step loop, stopped when dropped (after the requests in flight end).
pub struct StepLoop {
    submit: Mutex<Option<Sender<Submission>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<SchedulerStats>>,
    graph_counts: Arc<Mutex<graph::StepCounts>>,
    settings: Arc<Mutex<StepSettings>>,
    block_tokens: usize,
    blocks: usize,
}

/// The CPU pool's other threads kept awake through a step (llama.cpp's compute threads spin
/// between operations): each runs a job that executes the pool's pending work as soon as there
/// is any (`rayon::yield_now`) until the step ends. Asleep, a thread was woken through the
/// kernel for each of a token's ~120 small parallel products (about 15 % of a decode on 2
/// cores in `perf`). Only inside the CPU step loop's pool (`rayon::current_thread_index`); the
/// spinning stops when this is dropped.
struct KeepAwake(Arc<AtomicBool>);

impl KeepAwake {
    fn start() -> Option<Self> {
        let step_thread = rayon::current_thread_index()?;
        let others = rayon::current_num_threads().saturating_sub(1);
        if others == 0 {
            return None;
        }
        let running = Arc::new(AtomicBool::new(true));
        for _ in 0..others {
            let running = Arc::clone(&running);
            rayon::spawn(move || {
                // The step's own thread may take this job while it waits for stolen work; it
                // must not spin there (the step that ends the spinning is below it).
                if rayon::current_thread_index() == Some(step_thread) {
                    return;
                }
                // Idle, it gives its core to the scheduler now and then, in case the process
                // has fewer cores than threads.
                let mut idle = 0u32;
                while running.load(Ordering::Relaxed) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle = 0;
                    } else {
                        idle = idle.wrapping_add(1);
                        if idle.is_multiple_of(64) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
            });
        }
        Some(Self(running))
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Device memory a model needs beside its weights and KV cache, estimated from its shapes
/// (vLLM measures the same with a profiling step before sizing its cache): the largest
/// step's activations (`max_num_batched_tokens` tokens, each with its residual, normalised,
/// q/k/v, gate/up and SwiGLU rows in the model's dtype), its attention scores (at most
/// [`inference_pio_kernels::paged::MAX_SCORES`] a launch, scores and probabilities), the
/// logits of `max_num_seqs` rows (f32 and the dtype), and the recorded decode steps kept on
/// CUDA (`graph::KEPT_SHAPES` + 1 of them, each retaining every layer's intermediates for up
/// to 256 rows). A mixture of experts ([`MoeSpec`](crate::moe::MoeSpec)) adds its padded
/// expert batches: a step's host-placed runs ([`crate::moe::expert_batch_bytes`]) and, per
/// kept graph, one layer's every-expert products of up to
/// [`crate::moe::ALL_EXPERTS_MAX_ROWS`] rows.
pub fn step_reserve_bytes(c: &crate::hf_config::DecoderConfig, moe: Option<&crate::moe::MoeSpec>, dtype_bytes: u64, settings: &OptimizationSettings) -> u64 {
    let (h, d) = (c.hidden_size as u64, c.head_dim as u64);
    let heads = (c.num_attention_heads + 2 * c.num_key_value_heads) as u64;
    let per_token = dtype_bytes * (4 * h + 2 * heads * d + 3 * c.intermediate_size as u64);
    let rows = u64::from(settings.max_num_seqs);
    let logits = rows * c.vocab_size as u64 * (4 + dtype_bytes);
    let experts_step = moe.map_or(0, |m| crate::moe::expert_batch_bytes(m, c.hidden_size, settings.max_num_batched_tokens as usize, dtype_bytes));
    let step = u64::from(settings.max_num_batched_tokens) * per_token + 2 * inference_pio_kernels::paged::MAX_SCORES as u64 * dtype_bytes + logits + experts_step;
    let graphs = if settings.cuda_graphs {
        let graph_rows = rows.min(256);
        let experts_graph = moe.map_or(0, |m| crate::moe::all_experts_bytes(m, c.hidden_size, (graph_rows as usize).min(crate::moe::ALL_EXPERTS_MAX_ROWS), dtype_bytes));
        (graph::KEPT_SHAPES as u64 + 1) * (c.num_hidden_layers as u64 * graph_rows * per_token + graph_rows * c.vocab_size as u64 * (4 + dtype_bytes) + experts_graph)
    } else {
        0
    };
    step + graphs
}

/// Twice what the largest step needs beside the weights and KV cache ([`step_reserve_bytes`]
/// without recorded steps): an idle loop with less device memory free than this drops its
/// recorded decode steps, whose pool pages would otherwise stay out of the next steps' reach.
fn idle_free_floor(model: &Model, limits: &scheduler::Limits) -> u64 {
    let settings = OptimizationSettings {
        max_num_batched_tokens: limits.max_num_batched_tokens.try_into().unwrap_or(u32::MAX),
        max_num_seqs: limits.max_num_seqs.try_into().unwrap_or(u32::MAX),
        cuda_graphs: false,
        ..Default::default()
    };
    2 * step_reserve_bytes(&model.decoder.config, model.decoder.spec.moe.as_ref(), model.decoder.dtype.size_bytes(), &settings)
}

/// Blocks the KV cache gets: `kv_cache_gb`, else (CUDA) `gpu_memory_utilization` (default
/// 0.9) of the device memory free after the weights, less what the steps need beside it
/// (`reserve`, [`step_reserve_bytes`]), else (CPU) 0.5 GB; never above the plugin's memory
/// limit less the weights, nor above `max_num_seqs` full contexts.
#[allow(clippy::too_many_arguments)]
pub fn kv_cache_blocks(
    settings: &OptimizationSettings,
    block_bytes: u64,
    weight_bytes: u64,
    limit_gb: Option<f64>,
    device_free: Option<u64>,
    reserve: u64,
    max_context: usize,
) -> Result<(usize, String), EngineError> {
    let bt = settings.kv_block_tokens as usize;
    let (mut budget, mut why) = match (settings.kv_cache_gb, device_free) {
        (Some(gb), _) => ((gb * 1e9) as u64, format!("kv_cache_gb = {gb}")),
        (None, Some(free)) => {
            let share = settings.gpu_memory_utilization.unwrap_or(0.9);
            let shared = (free as f64 * share) as u64;
            let left = free.saturating_sub(reserve);
            if left < shared {
                (left, format!("the {:.2} GB free after the weights less {:.2} GB for the steps' activations", free as f64 / 1e9, reserve as f64 / 1e9))
            } else {
                (shared, format!("{share} of the {:.2} GB free after the weights", free as f64 / 1e9))
            }
        }
        (None, None) => (500_000_000, "the CPU default of 0.5 GB (kv_cache_gb)".to_string()),
    };
    if let Some(limit) = limit_gb {
        let left = ((limit * 1e9) as u64).saturating_sub(weight_bytes);
        if left < budget {
            budget = left;
            why = format!("the memory limit of {limit} GB less {:.3} GB of weights", weight_bytes as f64 / 1e9);
        }
    }
    let useful = settings.max_num_seqs as usize * max_context.div_ceil(bt);
    let blocks = ((budget / block_bytes.max(1)) as usize).min(useful);
    if blocks == 0 {
        return Err(EngineError::ResourceLimit(format!(
            "the KV cache gets no block: {why} holds no {block_bytes}-byte block of {bt} tokens"
        )));
    }
    Ok((blocks, why))
}

/// What a model's `build` makes on the loop's thread: the model (rank 0's decoder when it is
/// split), its KV pool, the other tensor-parallel ranks when it is split, and anything else.
pub type Built<T> = (Model, KvPool, Option<ranks::RankWorkers>, T);

impl StepLoop {
    /// Starts the loop thread, which first runs `build` (loading the weights and allocating
    /// the KV pool there: every device operation of the model then happens on that thread,
    /// one CUDA stream, which recording CUDA graphs needs), then serves. Returns the model
    /// and what `build` returned beside it, once it has.
    ///
    /// On the CPU the loop runs as one of the threads of a compute pool of its own (rayon's,
    /// as many threads as the process's pool): its products split their rows between that
    /// thread and the others. Outside a pool the loop's thread handed every product to the
    /// pool's threads and slept until they finished, while they spun between products beside
    /// it: two threads on two cores decoded 1.33x as fast as one.
    pub fn start<T: Send + 'static>(
        build: impl FnOnce() -> Result<Built<T>, EngineError> + Send + 'static,
        settings: &OptimizationSettings,
        cpu: bool,
    ) -> Result<(Self, Arc<Model>, T), EngineError> {
        let step = StepSettings::of(settings);
        let stats = Arc::new(Mutex::new(SchedulerStats::default()));
        let shared = Arc::new(Mutex::new(step));
        let (tx, rx) = channel();
        let (built_tx, built_rx) = channel::<Result<(Arc<Model>, T, usize, usize), EngineError>>();
        let (loop_stats, loop_settings) = (Arc::clone(&stats), Arc::clone(&shared));
        let graph_counts = Arc::new(Mutex::new(graph::StepCounts::default()));
        let loop_counts = Arc::clone(&graph_counts);
        let run = move || {
                let (model, pool, ranks, extra) = match build() {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                let model = Arc::new(model);
                let (blocks, block_tokens) = (pool.blocks(), pool.block_tokens());
                if let Ok(mut s) = loop_stats.lock() {
                    s.kv_blocks_total = blocks as u64;
                    s.kv_block_tokens = block_tokens as u64;
                }
                // The recorded decode steps and the pool they share are not `Send`: made here.
                let state = LoopState {
                    scheduler: Scheduler::new(BlockPool::new(blocks, block_tokens, step.prefix_caching), step.limits),
                    graphs: graph::DecodeGraphs::new(Arc::clone(&model)),
                    vision_graphs: vision_graph::VisionGraphs::new(Arc::clone(&model), step.cuda_graphs),
                    idle_free_floor: idle_free_floor(&model, &step.limits),
                    model: Arc::clone(&model),
                    pool: Rc::new(RefCell::new(pool)),
                    live: HashMap::new(),
                    stats: loop_stats,
                    settings: loop_settings,
                    next_id: 1,
                    cuda_graphs: step.cuda_graphs,
                    async_scheduling: step.async_scheduling,
                    in_flight: None,
                    ranks,
                    clock: StepClock::default(),
                    graph_counts: loop_counts,
                };
                if built_tx.send(Ok((model, extra, blocks, block_tokens))).is_err() {
                    return;
                }
                state.run(rx)
        };
        let thread = std::thread::Builder::new()
            .name("inference-pio-steps".into())
            .spawn(move || {
                let threads = rayon::current_num_threads();
                let pool = cpu.then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("inference-pio-cpu-{i}")).build().ok()).flatten();
                match pool {
                    Some(pool) => pool.install(run),
                    None => run(),
                }
            })
            .map_err(|e| EngineError::Device(format!("cannot start the step loop thread: {e}")))?;
        let (model, extra, blocks, block_tokens) = match built_rx.recv() {
            Ok(Ok(built)) => built,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(EngineError::Device("the model's loader thread ended without a model (it panicked)".into()));
            }
        };
        let this = Self {
            submit: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
            graph_counts,
            settings: shared,
            block_tokens,
            blocks,
        };
        Ok((this, model, extra))
    }

    pub fn submit(&self, submission: Submission) -> Result<(), EngineError> {
        let guard = self.submit.lock().map_err(|_| EngineError::Device("the step loop's queue lock is poisoned".into()))?;
        let tx = guard.as_ref().ok_or_else(|| EngineError::Device("the model is being unloaded".into()))?;
        tx.send(submission).map_err(|_| EngineError::Device("the model's step loop has stopped (an earlier failure)".into()))
    }

    /// Applies the settings that may change while serving.
    pub fn configure(&self, settings: &OptimizationSettings) {
        if let Ok(mut s) = self.settings.lock() {
            *s = StepSettings::of(settings);
        }
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Counts of the device-resident decode steps (direct, recorded, replayed).
    pub fn graph_counts(&self) -> graph::StepCounts {
        self.graph_counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }
}

impl Drop for StepLoop {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.submit.lock() {
            tx.take();
        }
        if let Ok(mut thread) = self.thread.lock()
            && let Some(handle) = thread.take()
        {
            let _ = handle.join();
        }
    }
}

/// A request inside the loop.
struct Live {
    /// `None` for scoring.
    output: Option<Output>,
    prompt_len: usize,
    events: Sender<(usize, Event)>,
    tag: usize,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    /// When a step first computed part of it (the end of its wait for admission).
    scheduled: Option<Instant>,
    token_times: Vec<Instant>,
    /// Scoring: logits by position.
    logits: Vec<Option<Vec<f32>>>,
    cached_tokens: usize,
    /// The prompt's images, encoded by the first step that needs each (kept until the
    /// request ends, so a chunked or preempted prompt encodes each image once).
    features: Vec<Option<ImageFeatures>>,
}

/// Where the step loop's time goes.
#[derive(Clone, Copy)]
enum Phase {
    /// Taking submissions, cancellations, settings, counters.
    Other,
    Schedule,
    /// Building and queuing the step (a recorded step: refreshing its inputs, replaying it).
    Launch,
    /// Queuing the picks and their read.
    Pick,
    /// Waiting for the device's results.
    Wait,
    /// Sampling, detokenising, stop checks and streaming each row's token.
    Tokens,
}

/// With `INFERENCE_PIO_LOG`: every 64 steps (every step with `INFERENCE_PIO_LOG=steps`), the
/// mean time a step took, its rows and tokens, and how the time was spent (a loop that waits
/// little for the device is bound by the host, not the GPU).
#[derive(Default)]
struct StepClock {
    since: Option<Instant>,
    last: Option<Instant>,
    steps: u32,
    rows: usize,
    tokens: usize,
    phases: [std::time::Duration; 6],
}

impl StepClock {
    fn every() -> u32 {
        static EVERY: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        *EVERY.get_or_init(|| if std::env::var("INFERENCE_PIO_LOG").is_ok_and(|v| v == "steps") { 1 } else { 64 })
    }
    const NAMES: [&'static str; 6] = ["other", "schedule", "launch", "pick", "wait", "tokens"];

    /// Counts the time since the last mark as `phase`.
    fn mark(&mut self, phase: Phase) {
        if !crate::progress::enabled() {
            return;
        }
        let now = Instant::now();
        if let Some(last) = self.last {
            self.phases[phase as usize] += now.duration_since(last);
        }
        self.last = Some(now);
    }

    /// Ends a step; `graph`: the recorded steps' refresh and queuing times (taken).
    fn step(&mut self, graph: &mut [std::time::Duration; 2], work: &[Scheduled]) {
        if !crate::progress::enabled() {
            return;
        }
        self.mark(Phase::Other);
        let since = *self.since.get_or_insert_with(Instant::now);
        self.steps += 1;
        self.rows += work.len();
        self.tokens += work.iter().map(|w| w.len).sum::<usize>();
        if self.steps == Self::every() {
            let n = f64::from(self.steps);
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n;
            let wall = since.elapsed();
            let parts: Vec<String> = Self::NAMES.iter().zip(self.phases).map(|(name, d)| format!("{name} {:.2}", ms(d))).collect();
            let [refresh, replay] = std::mem::take(graph);
            crate::progress::log(|| {
                format!(
                    "steps: {:.2} ms a step of {:.0} rows, {:.0} tokens ({}; of launch: refresh {:.2}, replay {:.2})",
                    ms(wall),
                    self.rows as f64 / n,
                    self.tokens as f64 / n,
                    parts.join(", "),
                    ms(refresh),
                    ms(replay)
                )
            });
            *self = Self { since: Some(Instant::now()), last: self.last, ..Self::default() };
        }
    }
}

/// A decode step queued on the device whose picks are still being read back.
struct InFlight {
    work: Vec<Scheduled>,
    /// Each sequence's row in `picked`.
    rows: HashMap<u64, usize>,
    /// The ids picked on the device, `[rows]` (the next step's tokens are gathered from them).
    picked: Tensor<1, Int>,
    read: inference_pio_kernels::readback::PendingRead,
    /// Rows whose grammar failed while the step was queued.
    failed: Vec<(u64, EngineError)>,
}

struct LoopState {
    model: Arc<Model>,
    pool: Rc<RefCell<KvPool>>,
    graphs: graph::DecodeGraphs,
    /// The vision tower's recorded encodings of small images (vision-language models).
    vision_graphs: vision_graph::VisionGraphs,
    /// Free device memory below which the idle loop drops its recorded decode steps
    /// ([`idle_free_floor`]).
    idle_free_floor: u64,
    cuda_graphs: bool,
    async_scheduling: bool,
    /// The other ranks of a tensor-parallel model (this thread is rank 0).
    ranks: Option<ranks::RankWorkers>,
    /// A decode step queued on the device and not read back yet.
    in_flight: Option<InFlight>,
    clock: StepClock,
    graph_counts: Arc<Mutex<graph::StepCounts>>,
    scheduler: Scheduler,
    live: HashMap<u64, Live>,
    stats: Arc<Mutex<SchedulerStats>>,
    settings: Arc<Mutex<StepSettings>>,
    next_id: u64,
}

impl LoopState {
    /// Called as the loop goes idle: short of device memory, the recorded decode steps are
    /// dropped and CubeCL's pools hand their free pages back to the driver. Each recording
    /// holds pool pages of its own (the 12-layer Qwen3-Coder-30B's pools grew 0.3-2 GB a
    /// recording), and steps of many shapes leave pages of many sizes that no later shape
    /// fits: on an H100 beside a KV cache of 0.9 of its memory, the pools held 5.8 GB more than
    /// their live tensors after eight batch sizes, and the next batch's 853 MiB page found no
    /// memory (2026-12-06). Not otherwise: the next request's first steps would ask the driver
    /// for their pages again (+44 ms to the time to first token of a 100-token prompt there).
    fn release_memory_if_short(&mut self) {
        let device = &self.model.decoder.device;
        if inference_pio_kernels::memory::device_free(device).is_none_or(|free| free >= self.idle_free_floor) {
            return;
        }
        let dropped = self.graphs.drop_recordings() + self.vision_graphs.drop_recordings();
        if let Some(r) = &self.ranks
            && let Err(e) = r.drop_recordings()
        {
            crate::progress::log(|| format!("the other ranks' recorded steps: {e}"));
        }
        inference_pio_kernels::memory::release_free_memory(device);
        crate::progress::log(|| {
            let usage = inference_pio_kernels::memory::pool_usage_text(device).map_or(String::new(), |u| format!("; {u}"));
            format!("idle with less than {:.2} GB free: {dropped} recorded decode steps and image encodings dropped, free pool pages released{usage}", self.idle_free_floor as f64 / 1e9)
        });
    }

    fn run(mut self, rx: Receiver<Submission>) {
        // Whether steps ran since the loop was last idle.
        let mut stepped = false;
        loop {
            if self.scheduler.is_idle() && self.in_flight.is_none() {
                let next = match rx.try_recv() {
                    Err(TryRecvError::Empty) => {
                        if std::mem::take(&mut stepped) {
                            self.release_memory_if_short();
                        }
                        rx.recv().map_err(|_| ())
                    }
                    other => other.map_err(|_| ()),
                };
                match next {
                    Ok(s) => self.admit(s),
                    Err(()) => return,
                }
            }
            stepped = true;
            while let Ok(s) = rx.try_recv() {
                self.admit(s);
            }
            self.apply_settings();
            self.drop_cancelled();
            if self.scheduler.is_idle() {
                if let Some(flight) = self.in_flight.take() {
                    self.complete(flight);
                }
                continue;
            }
            // With a step in flight, this one is scheduled before that one's tokens are known
            // (its sequences hold placeholders for them).
            self.clock.mark(Phase::Other);
            let mut work = self.scheduler.schedule();
            self.clock.mark(Phase::Schedule);
            if work.is_empty() {
                if let Some(flight) = self.in_flight.take() {
                    // Every running sequence ends with the step in flight.
                    self.complete(flight);
                    continue;
                }
                // Nothing fits (cannot happen for admitted requests, which each fit the pool
                // alone); fail rather than spin.
                self.fail_all(&EngineError::ResourceLimit("the scheduler could not place any request in the KV cache".into()));
                continue;
            }
            let now = Instant::now();
            for w in &work {
                if let Some(live) = self.live.get_mut(&w.id) {
                    live.scheduled.get_or_insert(now);
                }
            }
            let result = self.step(&mut work);
            if let Err(e) = result {
                if let Some(flight) = self.in_flight.take() {
                    self.complete(flight);
                }
                for w in &work {
                    self.end(w.id, Err(e.clone()));
                }
            }
            if let Ok(mut s) = self.stats.lock() {
                s.steps += 1;
            }
            self.clock.step(&mut self.graphs.timing, &work);
            self.publish_stats();
        }
    }

    fn apply_settings(&mut self) {
        if let Ok(s) = self.settings.lock() {
            self.scheduler.limits = s.limits;
            self.scheduler.pool.set_prefix_caching(s.prefix_caching);
            self.cuda_graphs = s.cuda_graphs;
            self.vision_graphs.set_cuda_graphs(s.cuda_graphs);
            self.async_scheduling = s.async_scheduling;
        }
    }

    /// Checks that the request can ever fit, then queues it.
    fn admit(&mut self, s: Submission) {
        let model = &self.model;
        let (prompt, output, reuse, most, media) = match &s.work {
            Work::Generate(r) => {
                // The cache holds at most every token but the last sampled one.
                let most = (r.prompt.len() + r.max_new_tokens).saturating_sub(1).min(model.max_context.saturating_sub(1)).max(r.prompt.len());
                (r.prompt.clone(), Some(Output::new(r, model.output_format)), true, most, r.media.clone())
            }
            Work::Score { ids, media } => (ids.clone(), None, false, ids.len(), media.clone()),
        };
        if media.is_some() && model.decoder.vision.is_none() {
            let e = EngineError::InvalidRequest("this model does not take images".into());
            let _ = s.events.send((s.tag, Event::Done(Box::new(Err(e)))));
            return;
        }
        let images = media.as_ref().map_or(0, |m| m.images.len());
        let needed = self.scheduler.blocks_for(most);
        let total = self.scheduler.pool.total();
        if needed > total {
            let bt = self.scheduler.pool.block_tokens();
            let e = EngineError::ResourceLimit(format!(
                "the request needs up to {most} tokens of KV cache ({needed} blocks of {bt}: prompt {} + max_new_tokens), \
                 but the whole cache holds {} tokens ({total} blocks); shorten it or raise kv_cache_gb",
                prompt.len(),
                total * bt
            ));
            let _ = s.events.send((s.tag, Event::Done(Box::new(Err(e)))));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let prompt_len = prompt.len();
        self.scheduler.add(SeqState::new(id, prompt, s.chunk, reuse, s.salt).with_media(media));
        self.live.insert(
            id,
            Live {
                output,
                prompt_len,
                events: s.events,
                tag: s.tag,
                cancel: s.cancel,
                submitted: Instant::now(),
                scheduled: None,
                token_times: Vec::new(),
                logits: if reuse { Vec::new() } else { vec![None; prompt_len] },
                cached_tokens: 0,
                features: vec![None; images],
            },
        );
    }

    fn drop_cancelled(&mut self) {
        let cancelled: Vec<u64> = self.live.iter().filter(|(_, l)| l.cancel.load(Ordering::Relaxed)).map(|(&id, _)| id).collect();
        for id in cancelled {
            if let Some(out) = self.live.get_mut(&id).and_then(|l| l.output.as_mut()) {
                out.cancel();
            }
            self.finish(id);
        }
    }

    fn fail_all(&mut self, e: &EngineError) {
        for id in self.scheduler.ids() {
            self.end(id, Err(e.clone()));
        }
    }

    /// Whether `work` can be queued behind the step in flight: decode rows only, each
    /// continuing a row of that step (its token is that step's pick, on the device), all
    /// greedy, as one recorded decode step. Not for a split model: its other ranks are handed
    /// their tokens from the host.
    fn follows(&self, work: &[Scheduled], flight: &InFlight) -> bool {
        self.cuda_graphs
            && self.ranks.is_none()
            && self.async_scheduling
            && self.graphs.applies(work.len())
            && work.iter().all(|w| {
                w.len == 1
                    && flight.rows.contains_key(&w.id)
                    && self.scheduler.seq(w.id).is_some_and(|s| {
                        s.pending == 1 && w.start + 1 == s.tokens.len() && s.media.as_ref().is_none_or(|m| m.text_from(w.start))
                    })
                    && self.live.get(&w.id).and_then(|l| l.output.as_ref()).is_some_and(Output::is_plain_greedy)
            })
    }

    /// Runs one step and hands out its tokens; or, for a greedy decode step when
    /// `async_scheduling` is on, queues it and leaves it in flight (its tokens are handed out
    /// after the next step is queued). Sequences that end meanwhile leave `work`.
    fn step(&mut self, work: &mut Vec<Scheduled>) -> Result<(), EngineError> {
        let _awake = KeepAwake::start();
        let chained = self.in_flight.as_ref().is_some_and(|f| self.follows(work, f));
        if !chained {
            // This step needs the tokens of the one in flight on the host.
            if let Some(flight) = self.in_flight.take() {
                self.complete(flight);
                work.retain(|w| self.scheduler.seq(w.id).is_some());
                if work.is_empty() {
                    return Ok(());
                }
            }
        }
        let work: &[Scheduled] = work;
        let scores = |id: u64| self.live.get(&id).is_some_and(|l| l.output.is_none());
        let block_tokens = self.pool.borrow().block_tokens();
        // Decode rows only (text: no image token, one rotary position): the device-resident
        // step (recorded as a CUDA graph on CUDA).
        let text_row = |w: &Scheduled| self.scheduler.seq(w.id).is_some_and(|s| s.media.as_ref().is_none_or(|m| m.text_from(w.start)));
        let decode_only = work.iter().all(|w| w.len == 1 && w.start > 0 && !scores(w.id) && text_row(w));
        let (logits, logit_ranges) = if chained || self.cuda_graphs && decode_only && self.graphs.applies(work.len()) {
            let flight = self.in_flight.as_ref().filter(|_| chained);
            let rows: Vec<graph::DecodeRow<'_>> = work
                .iter()
                .filter_map(|w| {
                    let token = match flight {
                        Some(f) => graph::RowToken::Previous(*f.rows.get(&w.id)?),
                        None => graph::RowToken::Host(self.scheduler.seq(w.id)?.tokens[w.start]),
                    };
                    self.scheduler.seq(w.id).map(|s| graph::DecodeRow {
                        token,
                        position: w.start,
                        rope_position: s.media.as_ref().map_or(w.start, |m| m.rope_position(w.start)[0]),
                        blocks: &s.blocks,
                    })
                })
                .collect();
            if rows.len() != work.len() {
                return Err(EngineError::Device("a scheduled sequence is missing".into()));
            }
            if let Some(r) = &self.ranks {
                let host_rows = rows
                    .iter()
                    .map(|row| match row.token {
                        graph::RowToken::Host(token) => Ok(ranks::RankRow { token, position: row.position, rope_position: row.rope_position, blocks: row.blocks.to_vec() }),
                        graph::RowToken::Previous(_) => Err(EngineError::Device("a split model's decode step was chained on the device".into())),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                r.begin_decode(host_rows)?;
            }
            let logits = self.graphs.step(&rows, &self.pool, flight.map(|f| &f.picked));
            // The other ranks' steps are waited for even when this one failed.
            let others = self.ranks.as_ref().map_or(Ok(()), |r| r.finish());
            if let Ok(mut c) = self.graph_counts.lock() {
                *c = self.graphs.counts.clone();
            }
            let logits = logits?;
            others?;
            let ranges = (0..work.len()).map(|i| Some(i..i + 1)).collect::<Vec<_>>();
            (logits.narrow(0, 0, work.len()), ranges)
        } else {
            let batch = runner::step_batch(&self.scheduler, work, block_tokens, scores);
            let vision = self.step_vision(work)?;
            if let Some(r) = &self.ranks {
                r.begin(&batch.batch)?;
            }
            let logits = self.model.decoder.forward_with(&batch.batch, vision, &mut self.pool.borrow_mut());
            // The other ranks' passes are waited for even when this one failed.
            let others = self.ranks.as_ref().map_or(Ok(()), |r| r.finish());
            let logits = logits?;
            others?;
            (logits, batch.logit_ranges)
        };
        let vocab = self.model.decoder.config.vocab_size;
        // When every row that wants logits is greedy without a repetition penalty, the next
        // tokens are picked where the logits are and only they come back, not `rows x vocab`
        // f32 (our argmax kernel on CubeCL devices): on the H200 (Qwen3-4B, 256 rows, with
        // burn's argmax) offline throughput went from 820 to 1,772 output tokens/s.
        let device_argmax = logit_ranges.iter().any(Option::is_some)
            && logit_ranges.iter().zip(work).filter(|(r, _)| r.is_some()).all(|(_, w)| {
                self.live.get(&w.id).and_then(|l| l.output.as_ref()).is_some_and(Output::is_plain_greedy)
            });
        // The grammar masks of constrained rows, computed while the device runs the step (the
        // read-back below waits for it).
        let mut failed = Vec::new();
        for (w, rows) in work.iter().zip(&logit_ranges) {
            if let (Some(_), Some(out)) = (rows, self.live.get_mut(&w.id).and_then(|l| l.output.as_mut()))
                && let Err(e) = out.prepare_mask()
            {
                failed.push((w.id, e));
            }
        }
        self.clock.mark(Phase::Launch);
        if device_argmax && self.async_scheduling && (chained || self.cuda_graphs && decode_only) {
            // Queued, not waited for: the next step may be queued behind it.
            let picked = inference_pio_kernels::argmax::row_argmax(logits);
            let read = inference_pio_kernels::readback::start_read(picked.clone());
            self.clock.mark(Phase::Pick);
            let flight = InFlight { work: work.to_vec(), rows: work.iter().enumerate().map(|(i, w)| (w.id, i)).collect(), picked, read, failed };
            self.scheduler.computed(work);
            // Each sequence that goes on after this step gets a placeholder for its pick.
            for w in work {
                let (Some(live), Some(seq)) = (self.live.get(&w.id), self.scheduler.seq(w.id)) else { continue };
                let length = seq.tokens.len() + 1;
                if live.output.as_ref().is_some_and(|o| !o.ends_by_length(length - live.prompt_len, length, self.model.max_context)) {
                    self.scheduler.push_placeholder(w.id);
                }
            }
            let previous = self.in_flight.replace(flight);
            if let Some(previous) = previous {
                self.complete(previous);
            }
            return Ok(());
        }
        let (values, picked) = if device_argmax {
            let ids = inference_pio_kernels::argmax::row_argmax(logits)
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .map_err(|e| EngineError::Device(format!("cannot read the picked tokens: {e:?}")))?;
            (Vec::new(), ids.into_iter().map(|id| id as u32).collect::<Vec<u32>>())
        } else {
            let values = logits
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| EngineError::Device(format!("cannot read logits: {e:?}")))?;
            (values, Vec::new())
        };
        self.clock.mark(Phase::Wait);
        self.scheduler.computed(work);
        let now = Instant::now();
        for (w, rows) in work.iter().zip(&logit_ranges) {
            let Some(rows) = rows else { continue };
            if failed.iter().any(|(id, _)| *id == w.id) {
                continue;
            }
            let Some(live) = self.live.get_mut(&w.id) else { continue };
            if live.output.is_none() {
                // Scoring: keep every position's logits; done once the prompt is computed.
                for (i, r) in rows.clone().enumerate() {
                    if let Some(slot) = live.logits.get_mut(w.start + i) {
                        *slot = Some(values[r * vocab..(r + 1) * vocab].to_vec());
                    }
                }
                if w.start + w.len == live.prompt_len {
                    self.finish(w.id);
                }
                continue;
            }
            let r = rows.end - 1;
            let Some(seq) = self.scheduler.seq(w.id) else { continue };
            let Some(out) = live.output.as_mut() else { continue };
            let eos = &self.model.eos_token_ids;
            let picked = match picked.get(r) {
                Some(&id) => Ok((id, None)),
                None => out.sample(&values[r * vocab..(r + 1) * vocab], &seq.tokens, &self.model.tokenizer, eos),
            };
            // A grammar that fails (its step budget) fails its own request, not the batch.
            let pushed = picked.and_then(|(id, logprobs)| {
                out.push(&self.model.tokenizer, eos, id, logprobs, seq.tokens.len() + 1, self.model.max_context).map(|p| (id, p))
            });
            let (id, (text, detail)) = match pushed {
                Ok(p) => p,
                Err(e) => {
                    failed.push((w.id, e));
                    continue;
                }
            };
            self.scheduler.push_token(w.id, id);
            self.deliver(w.id, id, text, detail, now);
        }
        for (id, e) in failed {
            self.end(id, Err(e));
        }
        self.clock.mark(Phase::Tokens);
        Ok(())
    }

    /// Streams the token just pushed to sequence `id`'s output, at `at`, and ends the request
    /// when that token finished it or its consumer has gone.
    fn deliver(&mut self, id: u64, token: u32, text: String, detail: TokenDetail, at: Instant) {
        let Some(live) = self.live.get_mut(&id) else { return };
        if live.token_times.is_empty() {
            live.cached_tokens = self.scheduler.seq(id).map_or(0, |s| s.cached_tokens);
        }
        live.token_times.push(at);
        let delivered = live.events.send((live.tag, Event::Token { id: token, text, detail })).is_ok();
        let Some(out) = live.output.as_mut() else { return };
        if !delivered {
            out.cancel();
        }
        if out.finish.is_some() {
            self.finish(id);
        }
    }

    /// Reads back a step left in flight and hands out its tokens (filling the placeholders
    /// the sequences hold for them).
    fn complete(&mut self, flight: InFlight) {
        let InFlight { work, rows, read, mut failed, .. } = flight;
        self.clock.mark(Phase::Other);
        let read = read.wait();
        self.clock.mark(Phase::Wait);
        let picked = match read {
            Ok(ids) => ids,
            Err(e) => {
                let e = EngineError::Device(format!("cannot read the picked tokens: {e}"));
                for w in &work {
                    self.end(w.id, Err(e.clone()));
                }
                return;
            }
        };
        let now = Instant::now();
        for w in &work {
            if failed.iter().any(|(id, _)| *id == w.id) {
                continue;
            }
            let (Some(&row), Some(live)) = (rows.get(&w.id), self.live.get_mut(&w.id)) else { continue };
            let Some(&id) = picked.get(row) else { continue };
            let id = id as u32;
            let position = w.start + 1;
            if !self.scheduler.set_token(w.id, position, id) {
                // No placeholder: its last token (or it is gone).
                if self.scheduler.seq(w.id).is_some_and(|s| s.tokens.len() == position) {
                    self.scheduler.push_token(w.id, id);
                } else {
                    continue;
                }
            }
            let Some(out) = live.output.as_mut() else { continue };
            let eos = &self.model.eos_token_ids;
            let (text, detail) = match out.push(&self.model.tokenizer, eos, id, None, position + 1, self.model.max_context) {
                Ok(p) => p,
                Err(e) => {
                    failed.push((w.id, e));
                    continue;
                }
            };
            self.deliver(w.id, id, text, detail, now);
        }
        for (id, e) in failed {
            self.end(id, Err(e));
        }
        self.clock.mark(Phase::Tokens);
    }

    /// The image features of this step's image tokens (encoding each image the first time a
    /// step reaches it), in the rows [`runner::step_batch`] gives them; `None` when the step
    /// has none.
    fn step_vision(&mut self, work: &[Scheduled]) -> Result<Option<StepVision>, EngineError> {
        if self.model.decoder.vision.is_none() {
            return Ok(None);
        }
        let (mut rows, mut embeds) = (Vec::new(), Vec::new());
        let mut deepstack: Vec<Vec<Tensor<2>>> = Vec::new();
        let mut first_row = 0;
        for w in work {
            let base = first_row;
            first_row += w.len;
            let Some(media) = self.scheduler.seq(w.id).and_then(|s| s.media.clone()) else { continue };
            let Some(live) = self.live.get_mut(&w.id) else { continue };
            let step = w.start..w.start + w.len;
            for (i, image) in media.images.iter().enumerate() {
                let (from, to) = (image.start.max(step.start), image.range().end.min(step.end));
                if from >= to {
                    continue;
                }
                let slot = live.features.get_mut(i).ok_or_else(|| EngineError::Device("an image's feature slot is missing".into()))?;
                let features = match slot {
                    Some(f) => f,
                    empty => empty.insert(self.vision_graphs.encode(&image.pixels, image.grid)?),
                };
                rows.extend((from..to).map(|p| (base + p - w.start) as i64));
                let (offset, n) = (from - image.start, to - from);
                embeds.push(features.embeds.clone().narrow(0, offset, n));
                deepstack.resize_with(features.deepstack.len(), Vec::new);
                for (layer, f) in features.deepstack.iter().enumerate() {
                    deepstack[layer].push(f.clone().narrow(0, offset, n));
                }
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let n = rows.len();
        Ok(Some(StepVision {
            rows: Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &self.model.decoder.device),
            embeds: Tensor::cat(embeds, 0),
            deepstack: deepstack.into_iter().map(|parts| Tensor::cat(parts, 0)).collect(),
        }))
    }

    /// Ends a request normally (finished, cancelled).
    fn finish(&mut self, id: u64) {
        let (used, total) = (self.scheduler.pool.used(), self.scheduler.pool.total());
        let Some(live) = self.live.get_mut(&id) else {
            self.scheduler.remove(id);
            return;
        };
        let result = match live.output.take() {
            Some(out) => out.into_result(),
            None => RowResult { new_ids: Vec::new(), text: String::new(), reasoning: String::new(), tool_calls: Vec::new(), finish: FinishReason::Length, logprobs: Vec::new() },
        };
        let logits: Vec<Vec<f32>> = std::mem::take(&mut live.logits).into_iter().flatten().collect();
        let mut timings = request_timings(live.submitted, &live.token_times, live.prompt_len, result.new_ids.len());
        timings.cached_prompt_tokens = live.cached_tokens as u64;
        timings.kv_blocks_used = used as u64;
        timings.kv_blocks_total = total as u64;
        timings.queued_s = live.scheduled.map_or(0.0, |at| at.duration_since(live.submitted).as_secs_f64());
        let done = Finished { result, logits, timings, submitted: live.submitted, token_times: std::mem::take(&mut live.token_times) };
        self.end(id, Ok(done));
    }

    fn end(&mut self, id: u64, outcome: Result<Finished, EngineError>) {
        self.scheduler.remove(id);
        if let Some(live) = self.live.remove(&id) {
            if let Ok(mut s) = self.stats.lock() {
                s.requests_finished += 1;
            }
            // Counters first: a caller reading them after its result sees its blocks freed.
            self.publish_stats();
            let _ = live.events.send((live.tag, Event::Done(Box::new(outcome))));
        }
    }

    fn publish_stats(&self) {
        if let Ok(mut s) = self.stats.lock() {
            let c = &self.scheduler.counters;
            let pool = &self.scheduler.pool;
            s.running = self.scheduler.running() as u64;
            s.waiting = self.scheduler.waiting() as u64;
            s.preemptions = c.preemptions;
            s.kv_blocks_used = pool.used() as u64;
            s.kv_blocks_total = pool.total() as u64;
            s.kv_block_tokens = pool.block_tokens() as u64;
            s.kv_blocks_cached = pool.cached_blocks() as u64;
            s.prefix_cache_queries = c.prefix_queries;
            s.prefix_cache_query_tokens = c.prefix_query_tokens;
            s.prefix_cache_hit_tokens = c.prefix_hit_tokens;
            s.prompt_tokens_computed = c.prefilled_tokens;
            s.decode_tokens_computed = c.decoded_tokens;
        }
    }
}

/// One request's timings from when it was submitted and when each token came.
pub fn request_timings(submitted: Instant, tokens: &[Instant], prompt_tokens: usize, generated: usize) -> Timings {
    let end = Instant::now();
    let mut t = Timings { prompt_tokens: prompt_tokens as u64, generated_tokens: generated as u64, total_s: end.duration_since(submitted).as_secs_f64(), ..Timings::default() };
    if let Some(&first) = tokens.first() {
        t.time_to_first_token_s = first.duration_since(submitted).as_secs_f64();
        t.prefill_tokens_per_s = prompt_tokens as f64 / t.time_to_first_token_s.max(1e-9);
    }
    decode_rates(&mut t, tokens, 1);
    t
}

/// Decode rates from token arrival times (sorted) of `rows` sequences: all tokens after the
/// first of each row, and the second half alone (past first-use kernel compilation).
pub fn decode_rates(t: &mut Timings, times: &[Instant], rows: usize) {
    let n = times.len();
    if n <= rows {
        return;
    }
    let span = times[n - 1].duration_since(times[rows - 1]).as_secs_f64();
    t.decode_tokens_per_s = (n - rows) as f64 / span.max(1e-9);
    let half = n / 2;
    if half >= 1 && n - half >= 2 {
        let span = times[n - 1].duration_since(times[half - 1]).as_secs_f64();
        t.steady_decode_tokens_per_s = (n - half) as f64 / span.max(1e-9);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf_config::DecoderConfig;

    /// Qwen3-4B-Instruct-2507's `config.json`.
    fn qwen3_4b() -> DecoderConfig {
        DecoderConfig::from_json_str(include_str!("../../testdata/qwen3-4b-config.json")).expect("config")
    }

    #[test]
    fn the_step_reserve_counts_the_largest_step_and_the_kept_graphs() {
        let settings = OptimizationSettings { max_num_batched_tokens: 8192, max_num_seqs: 256, cuda_graphs: true, ..Default::default() };
        let c = qwen3_4b();
        // 103,424 bytes of activations a token (bf16); 8,192 tokens, two 128 MiB score
        // buffers, 256 rows of logits; eight kept graphs of 256 rows over 36 layers.
        let per_token = 2 * (4 * 2560 + 2 * 48 * 128 + 3 * 9728);
        assert_eq!(per_token, 103_424);
        let logits = 256 * 151_936 * 6;
        let step = 8192 * per_token + 2 * (1 << 26) * 2 + logits;
        let graphs = 8 * (36 * 256 * per_token + logits);
        assert_eq!(step_reserve_bytes(&c, None, 2, &settings), step + graphs);
        let eager = OptimizationSettings { cuda_graphs: false, ..settings.clone() };
        assert_eq!(step_reserve_bytes(&c, None, 2, &eager), step);
    }

    #[test]
    fn a_mixture_of_experts_reserves_its_padded_expert_batches() {
        let settings = OptimizationSettings { max_num_batched_tokens: 8192, max_num_seqs: 256, cuda_graphs: true, ..Default::default() };
        let c = qwen3_4b();
        let moe = crate::moe::MoeSpec {
            num_experts: 128,
            top_k: 8,
            expert_intermediate: 768,
            shared_intermediate: None,
            router: crate::moe::Router::SoftmaxTopK { norm_topk_prob: true },
            sparse_layers: vec![true; 36],
        };
        // 8,192 tokens x 8 pairs, padded to at most 131,072 rows of 2 x 2,560 + 3 x 768 values
        // (bf16), and the runs' outputs twice; eight kept graphs each with 128 experts x 64 rows.
        let step = 131_072 * (2 * 2560 + 3 * 768) * 2 + 2 * 131_072 * 2560 * 2;
        let graphs = 8 * 128 * 64 * (2 * 2560 + 3 * 768) * 2;
        assert_eq!(step_reserve_bytes(&c, Some(&moe), 2, &settings) - step_reserve_bytes(&c, None, 2, &settings), step + graphs);
        let eager = OptimizationSettings { cuda_graphs: false, ..settings.clone() };
        assert_eq!(step_reserve_bytes(&c, Some(&moe), 2, &eager) - step_reserve_bytes(&c, None, 2, &eager), step);
    }

    #[test]
    fn the_kv_cache_leaves_the_steps_their_reserve() {
        let settings = OptimizationSettings { kv_block_tokens: 16, max_num_seqs: 256, ..Default::default() };
        let gb = 1_000_000_000u64;
        let block = 1_000_000;
        // Much free: 0.9 of it (the reserve fits in the other tenth).
        let (blocks, why) = kv_cache_blocks(&settings, block, 8 * gb, None, Some(135 * gb), 11 * gb, 262_144).expect("blocks");
        assert_eq!(blocks as u64, 135 * gb * 9 / 10 / block);
        assert!(why.contains("0.9 of the 135.00 GB"), "{why}");
        // Less free (an 80 GB card): the reserve binds.
        let (blocks, why) = kv_cache_blocks(&settings, block, 8 * gb, None, Some(73 * gb), 11 * gb, 262_144).expect("blocks");
        assert_eq!(blocks as u64, 62 * gb / block);
        assert!(why.contains("less 11.00 GB for the steps' activations"), "{why}");
        // `kv_cache_gb` is taken as given.
        let fixed = OptimizationSettings { kv_cache_gb: Some(40.0), ..settings.clone() };
        let (blocks, _) = kv_cache_blocks(&fixed, block, 8 * gb, None, Some(73 * gb), 11 * gb, 262_144).expect("blocks");
        assert_eq!(blocks as u64, 40 * gb / block);
        // A reserve larger than what is free leaves no block: an error naming the sizes.
        let err = kv_cache_blocks(&settings, block, 8 * gb, None, Some(10 * gb), 11 * gb, 262_144).expect_err("no room");
        assert!(err.to_string().contains("10.00 GB free after the weights less 11.00 GB"), "{err}");
    }
}
