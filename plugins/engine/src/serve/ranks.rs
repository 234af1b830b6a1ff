//! The other ranks of a tensor-parallel model (Megatron-LM; vLLM's multiprocessing executor
//! is the same design with processes): ranks 1..N each run on a thread of their own, with
//! their shard of the weights ([`crate::decoder::Decoder::load_rank`]) and a KV pool of their
//! own, while the step loop's thread is rank 0. The scheduler and the block tables stay one
//! per model: every step's flat batch goes to every rank, each rank runs the same forward
//! pass on its shards, and they meet in the collectives of its all-reduces and the logits'
//! gather. Rank 0's logits (the whole vocabulary) are the step's.
//!
//! A rank's device work all happens on its own thread, as rank 0's does on the loop's. A
//! decode step rank 0 runs as a recorded step ([`super::graph`]) each rank runs as its own
//! recorded step of the same shape, so the collectives are recorded on every rank's GPU.

use super::graph::{DecodeGraphs, DecodeRow, RowToken};
use crate::decoder::{Decoder, KvPool, StepBatch};
use crate::error::EngineError;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use inference_pio_kernels::KvStorage;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

/// One decode row of a recorded step, as the ranks are handed it (the token known on the
/// host: a split model's steps are not chained on the device).
#[derive(Clone, Debug)]
pub struct RankRow {
    pub token: u32,
    pub position: usize,
    pub rope_position: usize,
    pub blocks: Vec<u32>,
}

enum Job {
    /// Allocate the KV pool: blocks, tokens per block, and the model's context cap (the
    /// recorded steps' widths).
    Pool { blocks: usize, block_tokens: usize, max_context: usize, storage: KvStorage },
    Forward(StepBatch),
    /// A decode step through the rank's recorded steps.
    Decode(Arc<Vec<RankRow>>),
    /// Drop the recorded steps (the loop is short of device memory).
    DropRecordings,
}

struct Worker {
    rank: usize,
    jobs: Sender<Job>,
    done: Receiver<Result<(), EngineError>>,
    thread: Option<JoinHandle<()>>,
}

/// Ranks 1..N of a model, each on its thread.
pub struct RankWorkers {
    workers: Vec<Worker>,
}

impl RankWorkers {
    /// Starts a thread per rank in `ranks`, each loading its decoder with `load(rank)` (on its
    /// own device), and returns at once: [`Self::loaded`] waits for them.
    pub fn start(ranks: std::ops::Range<usize>, load: impl Fn(usize) -> Result<Decoder, EngineError> + Send + Sync + Clone + 'static) -> Result<Self, EngineError> {
        let mut workers = Vec::new();
        for rank in ranks {
            let (jobs, job_rx) = channel::<Job>();
            let (done_tx, done) = channel();
            let load = load.clone();
            let thread = std::thread::Builder::new()
                .name(format!("inference-pio-rank-{rank}"))
                .spawn(move || serve_rank(rank, load, job_rx, done_tx))
                .map_err(|e| EngineError::Device(format!("cannot start the thread of rank {rank}: {e}")))?;
            workers.push(Worker { rank, jobs, done, thread: Some(thread) });
        }
        Ok(Self { workers })
    }

    /// Waits until every rank has loaded; the first rank's error.
    pub fn loaded(&self) -> Result<(), EngineError> {
        self.wait_all("loading")
    }

    /// Every rank allocates its KV pool of `blocks` blocks of `block_tokens` tokens (the same
    /// blocks as rank 0's, each holding the rank's share of the KV heads), for a model of
    /// `max_context` tokens.
    pub fn new_kv_pools(&self, blocks: usize, block_tokens: usize, max_context: usize, storage: KvStorage) -> Result<(), EngineError> {
        self.send_all(|| Job::Pool { blocks, block_tokens, max_context, storage })?;
        self.wait_all("allocating the KV cache")
    }

    /// Hands `batch` to every rank; they run it while the caller runs rank 0's pass. The
    /// caller then waits for them with [`Self::finish`].
    pub fn begin(&self, batch: &StepBatch) -> Result<(), EngineError> {
        self.send_all(|| Job::Forward(batch.clone()))
    }

    /// Hands a decode step of `rows` to every rank, each to run as its recorded step of the
    /// shape rank 0 runs ([`DecodeGraphs::step`]); waited for with [`Self::finish`].
    pub fn begin_decode(&self, rows: Vec<RankRow>) -> Result<(), EngineError> {
        let rows = Arc::new(rows);
        self.send_all(|| Job::Decode(Arc::clone(&rows)))
    }

    /// Every rank drops its recorded steps (as rank 0 does when short of device memory).
    pub fn drop_recordings(&self) -> Result<(), EngineError> {
        self.send_all(|| Job::DropRecordings)?;
        self.wait_all("dropping the recorded steps")
    }

    /// Waits for every rank's pass of the step begun last.
    pub fn finish(&self) -> Result<(), EngineError> {
        self.wait_all("a step")
    }

    fn send_all(&self, job: impl Fn() -> Job) -> Result<(), EngineError> {
        for w in &self.workers {
            w.jobs.send(job()).map_err(|_| EngineError::Device(format!("tensor-parallel rank {} has stopped", w.rank)))?;
        }
        Ok(())
    }

    /// Every rank's answer to its last job; the first error (all are collected, so that no
    /// answer is left for the next job).
    fn wait_all(&self, what: &str) -> Result<(), EngineError> {
        let mut first = Ok(());
        for w in &self.workers {
            let answer = w.done.recv().unwrap_or_else(|_| Err(EngineError::Device(format!("tensor-parallel rank {} ended (it panicked)", w.rank))));
            if let (Err(e), true) = (answer, first.is_ok()) {
                first = Err(EngineError::Device(format!("tensor-parallel rank {}, {what}: {e}", w.rank)));
            }
        }
        first
    }
}

impl Drop for RankWorkers {
    fn drop(&mut self) {
        // Closing each job channel ends its thread's loop.
        let threads: Vec<_> = self.workers.drain(..).filter_map(|mut w| w.thread.take()).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One rank's thread: load, then answer each job in turn until the loop drops its sender.
fn serve_rank(rank: usize, load: impl Fn(usize) -> Result<Decoder, EngineError>, jobs: Receiver<Job>, done: Sender<Result<(), EngineError>>) {
    let decoder = match load(rank) {
        Ok(d) => {
            let _ = done.send(Ok(()));
            Arc::new(d)
        }
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    // The pool, and the recorded steps over it, once allocated.
    let mut cache: Option<(Rc<RefCell<KvPool>>, DecodeGraphs)> = None;
    let missing = || EngineError::Device("a step before the KV cache was allocated".into());
    while let Ok(job) = jobs.recv() {
        let answer = match job {
            Job::Pool { blocks, block_tokens, max_context, storage } => {
                let pool = Rc::new(RefCell::new(decoder.new_kv_pool_of(blocks, block_tokens, storage)));
                cache = Some((pool, DecodeGraphs::for_decoder(Arc::clone(&decoder) as Arc<dyn super::graph::StepDecoder>, max_context)));
                Ok(())
            }
            Job::Forward(batch) => match &cache {
                None => Err(missing()),
                Some((pool, _)) => decoder.forward_with(&batch, None, &mut pool.borrow_mut()).map(drop),
            },
            Job::Decode(rows) => match cache.as_mut() {
                None => Err(missing()),
                Some((pool, graphs)) => {
                    let rows: Vec<DecodeRow<'_>> = rows
                        .iter()
                        .map(|r| DecodeRow { token: RowToken::Host(r.token), position: r.position, rope_position: r.rope_position, blocks: &r.blocks })
                        .collect();
                    graphs.step(&rows, pool, None).map(drop)
                }
            },
            Job::DropRecordings => {
                if let Some((_, graphs)) = cache.as_mut() {
                    graphs.drop_recordings();
                }
                inference_pio_kernels::memory::release_free_memory(&decoder.device);
                Ok(())
            }
        };
        if done.send(answer).is_err() {
            return;
        }
    }
}
