//! Decode steps whose inputs live on the device, recorded once per shape as a CUDA graph and
//! replayed (vLLM's `CUDAGraphRunner`: batch-size buckets, padded inputs, static buffers
//! refreshed in place; NVIDIA CUDA Programming Guide, "CUDA Graphs"; burn's
//! `burn::tensor::capture`).
//!
//! Queuing one decode step's hundreds of small kernels costs the host more time than the GPU
//! needs to run them. A step of decode rows only (one token per sequence) has a shape fixed
//! by two numbers: its rows, padded up to a bucket (1, 2, 4, ... 256), and the context its
//! block tables cover, padded up to 256 slots times a power of two (recording a step took
//! ~200 ms at 256 rows on the H200; the decode kernel splits each row's own context, so the
//! padding costs only table entries). Everything that changes between steps — the tokens,
//! their positions, the slots they write, each row's block table and context length — is
//! written in place into device tensors the graph was recorded against, and padding rows
//! write and read the pool's scratch block. A new shape records a new graph; the last eight
//! shapes' graphs are kept, each with its own input buffers. On the CPU the same
//! device-resident step runs directly, so CPU tests check it against the host-built step.
//!
//! A tensor-parallel model's ranks each record their own step of the same shape, on their own
//! thread and GPU, with the NCCL collectives inside (NCCL User Guide, "Using NCCL with CUDA
//! Graphs"): every rank records and replays the same steps in the same order, since rank 0
//! hands each of its steps to the others.

use crate::decoder::{Decoder, KvPool, StepTensors};
use crate::error::EngineError;
use crate::generate::Model;
use burn::tensor::{Device, Graph, Int, Tensor, TensorData, capture, s};
use inference_pio_kernels::paged::{DecodeRows, PagedLayout, slot_of};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// Row counts a recorded step is padded to.
const ROW_BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
/// The context block tables cover is padded to a multiple of this many slots.
const WIDTH_STEP: usize = 256;

type StepFn = Box<dyn FnMut() -> Result<Tensor<2>, EngineError>>;

/// Where a decode row's token comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowToken {
    /// Known on the host.
    Host(u32),
    /// Row `n` of the ids the previous step picked on the device (still being read back).
    Previous(usize),
}

/// One decode row: its token, position (= the slot index in its sequence) and blocks.
pub struct DecodeRow<'a> {
    pub token: RowToken,
    pub position: usize,
    /// Its rotary position (`position`, or where multimodal positions put it).
    pub rope_position: usize,
    pub blocks: &'a [u32],
}

/// What the device-resident steps did (for the log and the tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Run directly (CPU, or after a failed capture).
    pub direct: usize,
    pub captures: usize,
    pub replays: usize,
    pub failed_captures: usize,
    /// Steps whose tokens came from the previous step's picks on the device (queued before
    /// those were read back).
    pub chained: usize,
}

/// The device tensors of one shape.
struct Inputs {
    rows: usize,
    width: usize,
    tokens: Tensor<1, Int>,
    positions: Tensor<1, Int>,
    slots: Tensor<1, Int>,
    /// Each row's blocks, `[rows * ceil(width / block_tokens)]` (reshaped for attention), and
    /// context length `[rows]`.
    table: Tensor<1, Int>,
    lens: Tensor<1, Int>,
    block_tokens: usize,
}

/// Recorded shapes kept besides the one in use (least recently used dropped first): a batch
/// whose rows shrink as requests end, or grow as they join, moves between buckets, and
/// recording a step anew took ~200 ms on the H200 (Qwen3-4B), several times a run.
pub(crate) const KEPT_SHAPES: usize = 7;

/// A recorded step not in use, with its inputs.
struct Kept {
    /// Declared before `shared`: the graph (which replays against its buffers) goes first.
    graph: Graph<Result<Tensor<2>, EngineError>, StepFn>,
    shared: Rc<RefCell<Shared>>,
}

/// The pool and the inputs a recorded step touches, shared with its closure.
struct Shared {
    pool: Rc<RefCell<KvPool>>,
    inputs: Inputs,
}

/// What a recorded step runs: a model's decoder (rank 0's when it is split), or another
/// tensor-parallel rank's.
pub trait StepDecoder {
    fn decoder(&self) -> &Decoder;
}

impl StepDecoder for Model {
    fn decoder(&self) -> &Decoder {
        &self.decoder
    }
}

impl StepDecoder for Decoder {
    fn decoder(&self) -> &Decoder {
        self
    }
}

/// The positions the rotary tables cover at first. Over a model's whole context they cost
/// memory no short conversation uses: Qwen3-4B's 262,144 positions of 128 rotary values take
/// 268 MB in f32 (the CPU) or 134 MB of GPU memory in bf16, SmolLM2's 8,192 took 4 MB of the
/// README main job's resident memory.
pub const ROPE_TABLE_START: usize = 1024;

pub struct DecodeGraphs {
    model: Arc<dyn StepDecoder>,
    /// The model's context cap (the widths' ceiling and the rotary tables' longest length).
    max_context: usize,
    /// Rotary tables, `[positions, rotary_dim]`: [`ROPE_TABLE_START`] positions (at most the
    /// context cap) at first, doubled when a step reaches past them ([`Self::cover`]).
    cos_table: Tensor<2>,
    sin_table: Tensor<2>,
    records: bool,
    /// A capture failed: steps run directly from then on.
    given_up: bool,
    /// Declared before `shared`: the graph (which replays against its buffers) goes first.
    graph: Option<Graph<Result<Tensor<2>, EngineError>, StepFn>>,
    shared: Option<Rc<RefCell<Shared>>>,
    /// Other shapes' recordings, oldest first.
    kept: Vec<Kept>,
    pub counts: StepCounts,
    /// With `INFERENCE_PIO_LOG`: time spent refreshing the inputs, and queuing the step.
    pub timing: [std::time::Duration; 2],
}

fn ints(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device)
}

/// The padded shape of a step of `rows` rows over contexts of at most `context` tokens, for a
/// model of `max_context` tokens: rows up to a bucket; the context up to 256 slots times a
/// power of two (so a growing context is recorded anew at 256, 512, 1,024 ... slots, not every
/// 256), at most the model's context rounded up to 256.
pub fn bucket(rows: usize, context: usize, max_context: usize) -> Option<(usize, usize)> {
    let rows = *ROW_BUCKETS.iter().find(|&&b| b >= rows)?;
    let steps = context.div_ceil(WIDTH_STEP).max(1).next_power_of_two();
    let most = max_context.div_ceil(WIDTH_STEP).max(1);
    Some((rows, steps.min(most).max(context.div_ceil(WIDTH_STEP)) * WIDTH_STEP))
}

impl DecodeGraphs {
    pub fn new(model: Arc<Model>) -> Self {
        let max_context = model.max_context;
        Self::for_decoder(model, max_context)
    }

    /// The recorded steps of `model`'s decoder, for contexts of at most `max_context` tokens
    /// (a tensor-parallel rank's own, beside rank 0's of the same shapes).
    pub fn for_decoder(model: Arc<dyn StepDecoder>, max_context: usize) -> Self {
        let device = model.decoder().device.clone();
        // Recorded steps (CUDA) read the tables they were recorded with, so growing the tables
        // drops the recordings ([`Self::cover`]), also while the step before is still running
        // from one (async scheduling): checked on an H100, 1,100 greedy tokens from position
        // 1,000 (two growths) equal to host-queued steps and to the CPU
        // (benches/gpu/run_long_context.sh, 2026-12-07).
        let (cos_table, sin_table) = model.decoder().rope_table(max_context.clamp(1, ROPE_TABLE_START));
        Self {
            records: device != Device::flex(),
            given_up: false,
            model,
            max_context,
            cos_table,
            sin_table,
            graph: None,
            shared: None,
            kept: Vec::new(),
            counts: StepCounts::default(),
            timing: Default::default(),
        }
    }

    /// Whether a decode step of `rows` rows can run here (a bucket exists, and the model
    /// routes that many rows without reading back to the host).
    pub fn applies(&self, rows: usize) -> bool {
        bucket(rows, 1, 1).is_some_and(|(padded, _)| self.model.decoder().step_stays_on_device(padded))
    }

    /// Makes the rotary tables cover `positions` positions: at least doubled, at most the
    /// context cap unless more are asked for. Recordings read the tables they were recorded
    /// with, so growing them drops every recording (a few times over a long context).
    fn cover(&mut self, positions: usize) {
        let have = self.cos_table.dims()[0];
        if positions <= have {
            return;
        }
        let rows = positions.max(have * 2).min(self.max_context.max(positions));
        (self.cos_table, self.sin_table) = self.model.decoder().rope_table(rows);
        if self.records {
            self.drop_recordings();
        }
    }

    /// The positions the rotary tables cover now.
    pub fn rope_table_positions(&self) -> usize {
        self.cos_table.dims()[0]
    }

    /// Drops every recording, the one in use included (each graph before its buffers), so
    /// that the pool pages they hold can go back to the driver; the next decode step records
    /// its shape anew. Returns how many were dropped.
    pub fn drop_recordings(&mut self) -> usize {
        let n = self.kept.len() + usize::from(self.graph.is_some());
        self.graph = None;
        self.shared = None;
        self.kept.clear();
        n
    }

    /// Runs one decode step for `rows` (a bucket must exist: [`Self::applies`]); f32 logits
    /// `[padded rows, vocab]`, the first `rows.len()` rows being the real ones. Rows are all
    /// [`RowToken::Host`], or all [`RowToken::Previous`] with `previous` the ids the step before
    /// picked (gathered on the device).
    pub fn step(&mut self, rows: &[DecodeRow<'_>], pool: &Rc<RefCell<KvPool>>, previous: Option<&Tensor<1, Int>>) -> Result<Tensor<2>, EngineError> {
        self.cover(rows.iter().map(|r| r.rope_position + 1).max().unwrap_or(1));
        let context = rows.iter().map(|r| r.position + 1).max().unwrap_or(1);
        let (padded, width) = bucket(rows.len(), context, self.max_context).ok_or_else(|| EngineError::InvalidRequest(format!("no decode bucket for {} rows", rows.len())))?;
        let device = self.model.decoder().device.clone();
        let (block_tokens, scratch) = {
            let p = pool.borrow();
            (p.block_tokens(), p.scratch_slot())
        };
        let same_shape = self.shared.as_ref().is_some_and(|s| s.borrow().has_shape(padded, width, pool));
        if !same_shape {
            // Keep this shape's recording for later; take the wanted shape's if it is kept.
            if let (Some(graph), Some(shared)) = (self.graph.take(), self.shared.take()) {
                self.kept.push(Kept { graph, shared });
                if self.kept.len() > KEPT_SHAPES {
                    // The least recently used (the graph goes before its buffers).
                    self.kept.remove(0);
                }
            }
            let wanted = self.kept.iter().position(|k| k.shared.borrow().has_shape(padded, width, pool));
            match wanted {
                Some(i) => {
                    let k = self.kept.remove(i);
                    self.graph = Some(k.graph);
                    self.shared = Some(k.shared);
                }
                None => {
                    self.shared = Some(Rc::new(RefCell::new(Shared { pool: Rc::clone(pool), inputs: Self::new_inputs(padded, width, block_tokens, &device) })));
                }
            }
        }
        // The step's values, padded.
        let mut tokens = vec![0i64; padded];
        // Rows of `previous` to gather the tokens from (padding rows: row 0).
        let mut sources = vec![0i64; padded];
        let chained = rows.iter().all(|r| matches!(r.token, RowToken::Previous(_)));
        if chained && previous.is_none() || !chained && rows.iter().any(|r| matches!(r.token, RowToken::Previous(_))) {
            return Err(EngineError::Device("a decode step mixes tokens known on the host and on the device, or lacks the previous picks".into()));
        }
        let mut positions = vec![0i64; padded];
        let mut slots = vec![scratch as i64; padded];
        let max_blocks = width.div_ceil(block_tokens);
        let mut table = vec![(scratch / block_tokens) as i64; padded * max_blocks];
        let mut lens = vec![1i64; padded];
        for (i, r) in rows.iter().enumerate() {
            match r.token {
                RowToken::Host(t) => tokens[i] = i64::from(t),
                RowToken::Previous(row) => sources[i] = row as i64,
            }
            positions[i] = r.rope_position as i64;
            slots[i] = slot_of(r.blocks, block_tokens, r.position) as i64;
            for (b, &id) in r.blocks.iter().take(max_blocks).enumerate() {
                table[i * max_blocks + b] = i64::from(id);
            }
            lens[i] = r.position as i64 + 1;
        }
        let Some(shared) = self.shared.clone() else {
            return Err(EngineError::Device("decode step inputs missing".into()));
        };
        let started = crate::progress::enabled().then(std::time::Instant::now);
        if self.graph.is_some() && !shared.borrow().is_unique() {
            // A refresh would land in a copy the graph never reads: record anew.
            self.graph = None;
            self.counts.failed_captures += 1;
        }
        {
            let mut s = shared.borrow_mut();
            let inputs = &mut s.inputs;
            // A whole-range slice assignment: one unit per element, in place. (burn's
            // `select_assign` over a 1-D tensor runs one unit that loops over every index:
            // refreshing a 256-row table of 48 blocks a row took milliseconds a step.)
            let refresh = |t: &mut Tensor<1, Int>, values: Vec<i64>| {
                let n = values.len();
                let new = ints(values, &device);
                t.inplace(|t| t.slice_assign(s![0..n], new));
            };
            match previous.filter(|_| chained) {
                Some(previous) => {
                    let gathered = previous.clone().select(0, ints(sources, &device));
                    let gathered = if gathered.dtype() == inputs.tokens.dtype() { gathered } else { gathered.cast(inputs.tokens.dtype()) };
                    inputs.tokens.inplace(|t| t.slice_assign(s![0..padded], gathered));
                    self.counts.chained += 1;
                }
                None => refresh(&mut inputs.tokens, tokens),
            }
            refresh(&mut inputs.positions, positions);
            refresh(&mut inputs.slots, slots);
            refresh(&mut inputs.table, table);
            refresh(&mut inputs.lens, lens);
        }
        let refreshed = started.map(|t| {
            self.timing[0] += t.elapsed();
            std::time::Instant::now()
        });
        let out = self.run(&shared, padded, width, &device);
        if let Some(t) = refreshed {
            self.timing[1] += t.elapsed();
        }
        out
    }

    /// Runs the step on its refreshed inputs: replayed, recorded or directly.
    fn run(&mut self, shared: &Rc<RefCell<Shared>>, padded: usize, width: usize, device: &Device) -> Result<Tensor<2>, EngineError> {
        if !self.records || self.given_up {
            self.counts.direct += 1;
            return self.run_direct(shared);
        }
        if self.graph.is_none() {
            if !shared.borrow().is_unique() {
                self.counts.failed_captures += 1;
                self.counts.direct += 1;
                return self.run_direct(shared);
            }
            let model = Arc::clone(&self.model);
            let (cos_table, sin_table) = (self.cos_table.clone(), self.sin_table.clone());
            let captured = Rc::clone(shared);
            let step: StepFn = Box::new(move || run_step(model.as_ref(), &captured, &cos_table, &sin_table));
            crate::progress::log(|| format!("recording the decode step: {padded} rows over {width} slots"));
            let graph = capture(device, step);
            self.counts.captures += 1;
            crate::progress::log(|| match inference_pio_kernels::memory::pool_usage_text(device) {
                Some(usage) => format!("recorded: {usage}"),
                None => "recorded".to_string(),
            });
            if !graph.is_hardware() {
                // burn would re-run the closure on replay; run the steps ourselves from now on.
                self.given_up = true;
                crate::progress::log(|| "the CUDA graph capture failed: decode steps run uncaptured".to_string());
                eprintln!("inference-pio: recording a decode step as a CUDA graph failed; decode steps run uncaptured");
                self.counts.failed_captures += 1;
                self.counts.direct += 1;
                return self.run_direct(shared);
            }
            self.graph = Some(graph);
        }
        let Some(graph) = self.graph.as_mut() else {
            return self.run_direct(shared);
        };
        // SAFETY: `Graph::replay` requires every buffer the recorded step touched to be alive,
        // unused by anything else during the replay, and refreshed on the recording stream.
        // The step reads the model's weights (held by the closure's `Arc` of the decoder), the pool and
        // the inputs (held by the closure's `Rc<Shared>`, the pool uniquely owned when it was
        // recorded and written in place since) and the rotary tables (owned by the closure);
        // intermediates are retained by the graph. A graph is kept or dropped together with
        // its own inputs, the graph first (`Kept`, and `graph` declared before `shared`). This
        // type is not `Send`: the refreshes, the replay and the logits' read all happen on the
        // thread that drives this decoder (the step loop's, or a rank's), the stream it
        // recorded on.
        let out = unsafe { graph.replay() };
        self.counts.replays += 1;
        out.clone()
    }

    fn run_direct(&self, shared: &Rc<RefCell<Shared>>) -> Result<Tensor<2>, EngineError> {
        run_step(self.model.as_ref(), shared, &self.cos_table, &self.sin_table)
    }

    fn new_inputs(rows: usize, width: usize, block_tokens: usize, device: &Device) -> Inputs {
        let zeros = |n: usize| ints(vec![0; n], device);
        let table = rows * width.div_ceil(block_tokens);
        Inputs {
            rows,
            width,
            tokens: zeros(rows),
            positions: zeros(rows),
            slots: zeros(rows),
            table: zeros(table),
            lens: ints(vec![1; rows], device),
            block_tokens,
        }
    }
}

impl Shared {
    /// Whether these are the inputs of a step of `rows` (padded) rows over `width` slots of
    /// `pool`.
    fn has_shape(&self, rows: usize, width: usize, pool: &Rc<RefCell<KvPool>>) -> bool {
        self.inputs.rows == rows && self.inputs.width == width && Rc::ptr_eq(&self.pool, pool)
    }

    /// Whether the pool and every input are uniquely owned, so refreshes land in place.
    fn is_unique(&self) -> bool {
        let i = &self.inputs;
        self.pool.borrow().is_unique()
            && i.tokens.can_mut()
            && i.positions.can_mut()
            && i.slots.can_mut()
            && i.table.can_mut()
            && i.lens.can_mut()
    }
}

/// The device-resident step itself: what is recorded, and what runs directly.
fn run_step(model: &dyn StepDecoder, shared: &RefCell<Shared>, cos_table: &Tensor<2>, sin_table: &Tensor<2>) -> Result<Tensor<2>, EngineError> {
    let s = shared.borrow();
    let inputs = step_tensors(&s.inputs, cos_table, sin_table);
    let mut pool = s.pool.borrow_mut();
    model.decoder().forward_tensors(&inputs, &mut pool)
}

/// The decoder's inputs from the device tensors (views and selects only: recordable).
fn step_tensors(inputs: &Inputs, cos_table: &Tensor<2>, sin_table: &Tensor<2>) -> StepTensors {
    let rows = inputs.rows;
    let rot = cos_table.dims()[1];
    let cos = cos_table.clone().select(0, inputs.positions.clone()).reshape([1, 1, rows, rot]);
    let sin = sin_table.clone().select(0, inputs.positions.clone()).reshape([1, 1, rows, rot]);
    StepTensors {
        tokens: inputs.tokens.clone(),
        cos,
        sin,
        slots: inputs.slots.clone(),
        layout: PagedLayout::decode(
            inputs.block_tokens,
            DecodeRows::new(inputs.table.clone().reshape([rows, inputs.width.div_ceil(inputs.block_tokens)]), inputs.lens.clone()),
        ),
        logit_rows: None,
        vision: None,
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn widths_grow_by_doubling_up_to_the_model_context() {
        assert_eq!(bucket(3, 100, 40960), Some((4, 256)));
        assert_eq!(bucket(1, 257, 40960), Some((1, 512)));
        assert_eq!(bucket(200, 1025, 40960), Some((256, 2048)));
        assert_eq!(bucket(1, 5000, 40960), Some((1, 8192)));
        // Capped at the context rounded up to 256 slots (40,960), never below the need.
        assert_eq!(bucket(1, 33_000, 40960), Some((1, 40960)));
        assert_eq!(bucket(1, 600, 500), Some((1, 768)));
        assert_eq!(bucket(257, 10, 40960), None);
    }
}
