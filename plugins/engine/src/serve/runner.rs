//! Builds one step's flat batch from the scheduler's decisions (vLLM v1
//! `gpu_model_runner.py`'s `_prepare_inputs`): each scheduled sequence's new tokens, their
//! positions, the cache slot each one's keys and values go to (through its block table), the
//! spans attention reads, and which rows need logits (the last of a sequence whose prompt is
//! done; every row when scoring).

use super::scheduler::{Scheduled, Scheduler};
use crate::decoder::StepBatch;
use inference_pio_kernels::paged::{Span, slot_of};
use std::ops::Range;

pub struct RunnerBatch {
    pub batch: StepBatch,
    /// Per scheduled entry, the rows of the step's logits that are its (`None`: no logits).
    pub logit_ranges: Vec<Option<Range<usize>>>,
}

/// The flat batch of `work` (decode rows first, as the scheduler orders it); `scores(id)`:
/// whether that sequence wants every position's logits.
pub fn step_batch(scheduler: &Scheduler, work: &[Scheduled], block_tokens: usize, scores: impl Fn(u64) -> bool) -> RunnerBatch {
    let mut batch = StepBatch::default();
    let mut logit_ranges = Vec::with_capacity(work.len());
    for w in work {
        let Some(seq) = scheduler.seq(w.id) else {
            logit_ranges.push(None);
            continue;
        };
        let first_row = batch.tokens.len();
        if seq.media.is_some() && batch.mrope.len() < first_row {
            // The first sequence with images: the rows before it are text.
            batch.mrope = batch.positions.iter().map(|&p| [p; 3]).collect();
        }
        for pos in w.start..w.start + w.len {
            batch.tokens.push(seq.tokens[pos]);
            batch.positions.push(pos);
            batch.slots.push(slot_of(&seq.blocks, block_tokens, pos));
            match &seq.media {
                Some(m) => batch.mrope.push(m.rope_position(pos)),
                None if !batch.mrope.is_empty() => batch.mrope.push([pos; 3]),
                None => {}
            }
        }
        batch.spans.push(Span { queries: w.len, context: w.start + w.len, blocks: seq.blocks.clone() });
        let rows = if scores(w.id) {
            Some(first_row..first_row + w.len)
        } else if w.start + w.len == seq.tokens.len() {
            Some(first_row + w.len - 1..first_row + w.len)
        } else {
            None
        };
        if let Some(r) = &rows {
            let base = batch.logit_rows.len();
            batch.logit_rows.extend(r.clone());
            logit_ranges.push(Some(base..base + r.len()));
        } else {
            logit_ranges.push(None);
        }
    }
    RunnerBatch { batch, logit_ranges }
}
