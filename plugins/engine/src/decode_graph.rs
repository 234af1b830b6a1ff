//! Decode steps whose inputs stay on the device, recorded once as a CUDA graph and replayed.
//!
//! References: NVIDIA CUDA Programming Guide, "CUDA Graphs" (stream capture, replay against
//! fixed buffers); burn 0.22 `burn::tensor::capture`; vLLM's `CUDAGraphRunner` (static input
//! buffers refreshed in place before each replay).
//!
//! Queuing one decode step's ~hundreds of small kernels costs more host time than the GPU
//! needs to run them (about 40 µs per kernel, `benches/results/`). A recorded graph replays
//! them in one launch. What a replay may not do is anything the host decided while recording:
//! every value that changes from step to step — the token ids, each row's rotary position,
//! the cache slot written — is read from a device tensor ([`DeviceStep`]) that is refreshed
//! in place before the replay, and the step never reads back to the host.
//!
//! A graph is valid while the cache keeps its storage: when a step needs a new block of
//! slots ([`crate::kv_cache::BLOCK_TOKENS`]) that step runs eagerly (the cache grows, the
//! buffers change) and the next one records a new graph for the wider storage.
//!
//! On the CPU there is nothing to record; the same device-resident step runs directly, so
//! the CPU tests check the step itself (it must equal the eager forward bit for bit).

use crate::decoder::{Decoder, DeviceStep, Logits};
use crate::error::EngineError;
use crate::kv_cache::KvCache;
use burn::tensor::{Device, Graph, IndexingUpdateOp, Int, Tensor, TensorData, capture};
use std::cell::RefCell;
use std::rc::Rc;

type StepFn<'a> = Box<dyn FnMut() -> Result<Tensor<3>, EngineError> + 'a>;

/// How decode steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// [`Decoder::forward`] with the token ids from the host (graphs off, or a step that
    /// reads back to the host).
    Eager,
    /// [`Decoder::device_step`], run directly (CPU, or after a failed capture).
    Device,
    /// [`Decoder::device_step`] recorded as a CUDA graph and replayed.
    Captured,
}

/// What the steps of one generation did, for the log and the benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub eager: usize,
    pub device: usize,
    pub captures: usize,
    pub replays: usize,
    /// Captures that did not give a hardware graph (the steps then ran uncaptured).
    pub failed_captures: usize,
}

/// The decode steps of one batch, owning its cache.
pub struct DecodeSteps<'a> {
    decoder: &'a Decoder,
    mode: StepMode,
    /// Declared before `state`: the graph (which replays against the state's buffers) goes
    /// first.
    graph: Option<Graph<Result<Tensor<3>, EngineError>, StepFn<'a>>>,
    state: Rc<RefCell<DeviceStep>>,
    /// `0..batch`, the rows refreshed in place.
    rows: Tensor<1, Int>,
    pub counts: StepCounts,
}

/// Whether `device` can record graphs (CUDA); flex cannot.
fn records_graphs(device: &Device) -> bool {
    *device != Device::flex()
}

impl<'a> DecodeSteps<'a> {
    /// Decode steps after the prefill that filled `cache`. `graphs`: the
    /// `cuda_graphs` optimization setting.
    pub fn new(decoder: &'a Decoder, cache: KvCache, graphs: bool) -> Self {
        let batch = cache.batch();
        let device = &decoder.device;
        let mode = if !graphs || !decoder.step_stays_on_device(batch) {
            StepMode::Eager
        } else if records_graphs(device) {
            StepMode::Captured
        } else {
            StepMode::Device
        };
        let pads: Vec<i64> = cache.pads().iter().map(|&p| p as i64).collect();
        let empty = Tensor::<2>::zeros([1, 1], device);
        let state = DeviceStep {
            slots: 0,
            tokens: int_tensor(vec![0; batch], device),
            positions: int_tensor(vec![0; batch], device),
            slot: int_tensor(vec![0], device),
            pads: int_tensor(pads, device).reshape([batch, 1]),
            // Placeholders until the first step sizes them.
            slot_ids: int_tensor(vec![0], device).reshape([1, 1]),
            cos_table: empty.clone(),
            sin_table: empty,
            cache,
        };
        let rows = int_tensor((0..batch as i64).collect(), device);
        Self { decoder, mode, graph: None, state: Rc::new(RefCell::new(state)), rows, counts: StepCounts::default() }
    }

    pub fn mode(&self) -> StepMode {
        self.mode
    }

    /// Slots filled per row.
    pub fn len(&self) -> usize {
        self.state.borrow().cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.state.borrow().cache.capacity()
    }

    /// One token per row after what the cache holds; f32 logits `[batch, 1, vocab]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor<3>, EngineError> {
        let decoder = self.decoder;
        let shared = {
            let mut guard = self.state.borrow_mut();
            let state = &mut *guard;
            let grows = state.cache.storage_slots() != state.cache.slots_for(1);
            if self.mode == StepMode::Eager || grows {
                // The storage is about to be replaced: a graph recorded over it is worthless.
                self.graph = None;
                let rows: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
                self.counts.eager += 1;
                return decoder.forward(&rows, &mut state.cache, Logits::Last);
            }
            let (batch, vocab) = (state.cache.batch(), decoder.config.vocab_size);
            if tokens.len() != batch {
                return Err(EngineError::InvalidRequest(format!("a decode step of {} tokens for {batch} rows", tokens.len())));
            }
            if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary (size {vocab})")));
            }
            let slots = state.cache.storage_slots();
            if state.slots != slots {
                self.graph = None;
                let (cos, sin) = decoder.rope_table(slots);
                state.cos_table = cos;
                state.sin_table = sin;
                state.slot_ids = Tensor::<1, Int>::arange(0..slots as i64, &decoder.device).reshape([1, slots]);
                state.slots = slots;
            }
            // A replay reads the buffers it was recorded with, so the refreshes below must
            // land in them rather than in copies.
            self.mode == StepMode::Captured && !state.inputs_are_unique()
        };
        if shared {
            self.fall_back("a step input is shared, so it cannot be refreshed in place");
        }
        {
            let mut guard = self.state.borrow_mut();
            let state = &mut *guard;
            let len = state.cache.len();
            let positions = state.cache.pads().iter().map(|&pad| len.saturating_sub(pad) as i64).collect();
            let device = &decoder.device;
            let ids = int_tensor(tokens.iter().map(|&t| t as i64).collect(), device);
            let (rows, first) = (self.rows.clone(), self.rows.clone().narrow(0, 0, 1));
            state.tokens.inplace(|t| t.select_assign(0, rows.clone(), ids, IndexingUpdateOp::Assign));
            state.positions.inplace(|t| t.select_assign(0, rows, int_tensor(positions, device), IndexingUpdateOp::Assign));
            state.slot.inplace(|t| t.select_assign(0, first, int_tensor(vec![len as i64], device), IndexingUpdateOp::Assign));
        }
        let out = if self.mode == StepMode::Captured { self.replay()? } else { self.device_step_now()? };
        self.state.borrow_mut().cache.advance(1);
        Ok(out)
    }

    /// Records the step on first use, then replays it.
    fn replay(&mut self) -> Result<Tensor<3>, EngineError> {
        if self.graph.is_none() {
            let (decoder, state) = (self.decoder, Rc::clone(&self.state));
            let step: StepFn<'a> = Box::new(move || decoder.device_step(&mut state.borrow_mut()));
            crate::progress::log(|| format!("recording the decode step over {} slots", self.state.borrow().slots));
            let graph = capture(&decoder.device, step);
            self.counts.captures += 1;
            if !graph.is_hardware() {
                // burn would re-run the closure on replay; run the step ourselves, uncaptured.
                self.fall_back("the CUDA graph capture failed");
                return self.device_step_now();
            }
            self.graph = Some(graph);
        }
        let Some(graph) = self.graph.as_mut() else {
            return self.device_step_now();
        };
        // SAFETY: `Graph::replay` requires that every buffer the recorded step touched is
        // alive, that nothing else uses them concurrently, and that refreshes and reads go to
        // the recording stream. The step reads the decoder's weights (borrowed for `'a`, which
        // outlives `self`) and the `DeviceStep` the closure holds through its `Rc` (cache
        // storage, inputs, rope tables); intermediates are retained by the recorded graph.
        // The graph is dropped before any of those buffers is replaced (`step` clears it when
        // the storage grows or the tables change; it is declared before `state`). This type
        // is not `Send`, all refreshes and the logits read happen on this thread's device
        // client, which is the stream it recorded on.
        let out = unsafe { graph.replay() };
        self.counts.replays += 1;
        out.clone()
    }

    fn device_step_now(&mut self) -> Result<Tensor<3>, EngineError> {
        self.counts.device += 1;
        self.decoder.device_step(&mut self.state.borrow_mut())
    }

    /// Steps run uncaptured from now on, for `why`.
    fn fall_back(&mut self, why: &str) {
        self.graph = None;
        self.mode = StepMode::Device;
        self.counts.failed_captures += 1;
        crate::progress::log(|| format!("decode steps run uncaptured: {why}"));
    }
}

/// `values` as a `[len]` integer tensor on `device`.
fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device)
}

impl DeviceStep {
    fn inputs_are_unique(&self) -> bool {
        self.tokens.can_mut() && self.positions.can_mut() && self.slot.can_mut() && self.cache.storage_is_unique()
    }
}
