//! The step loop's decisions (vLLM v1 `core/sched/scheduler.py`), pure logic over the
//! [`BlockPool`], tested without a model.
//!
//! Each step has a token budget (`max_num_batched_tokens`) and a cap on sequences
//! (`max_num_seqs`). Running sequences go first — decode rows before unfinished prompts — then
//! waiting prompts are admitted in arrival order (FCFS) with chunks filling what is left of
//! the budget (chunked prefill), after taking back the longest prefix of full blocks already
//! in the cache. A waiting prompt whose next block is being computed in this very step by
//! another sequence (requests sharing a system prompt, arriving together) waits for the next
//! step, where that block is in the cache, instead of computing it a second time (SGLang's
//! cache-aware scheduling does the same; vLLM v1 computes it twice). When a running sequence
//! needs a block and none is free, the most recently
//! admitted sequence not yet scheduled this step is preempted: its blocks are freed and it
//! goes back to the front of the queue with every token so far, to be recomputed.

use super::block_pool::{BlockHash, BlockId, BlockPool, block_hash};
use crate::multimodal::PromptMedia;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A sequence as the scheduler sees it.
pub struct SeqState {
    pub id: u64,
    /// Prompt, then the generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub computed: usize,
    /// The block table.
    pub blocks: Vec<BlockId>,
    /// Hashes of the full blocks of `tokens` (extended as tokens arrive).
    hashes: Vec<BlockHash>,
    /// Blocks registered as holding their hash.
    registered: usize,
    /// Keys the first block's hash takes (the tenant salt).
    pub salt: Vec<u8>,
    /// The prompt's images (their blocks' hashes take the images' content hashes).
    pub media: Option<Arc<PromptMedia>>,
    /// Prompt tokens per step at most; 0: the whole remaining prompt in one step.
    pub chunk: usize,
    /// May reuse cached prefix blocks (false when every position's logits are wanted).
    pub reuse_prefix: bool,
    /// Prompt tokens taken from the prefix cache at the last admission.
    pub cached_tokens: usize,
    /// Trailing entries of `tokens` not known yet: placeholders for tokens a step still in
    /// flight picks on the device ([`Scheduler::push_placeholder`]). Blocks holding one are
    /// neither hashed nor cached until [`Scheduler::set_token`] fills it.
    pub pending: usize,
}

impl SeqState {
    pub fn new(id: u64, tokens: Vec<u32>, chunk: usize, reuse_prefix: bool, salt: Vec<u8>) -> Self {
        Self { id, tokens, computed: 0, blocks: Vec::new(), hashes: Vec::new(), registered: 0, salt, media: None, chunk, reuse_prefix, cached_tokens: 0, pending: 0 }
    }

    pub fn with_media(mut self, media: Option<Arc<PromptMedia>>) -> Self {
        self.media = media;
        self
    }

    /// Hashes the full blocks not hashed yet, chained on the last known hash (each block is
    /// hashed once in a sequence's life, not the whole prefix again per new block).
    fn extend_hashes(&mut self, block_tokens: usize) {
        let full = (self.tokens.len() - self.pending) / block_tokens;
        for b in self.hashes.len()..full {
            let mut extra = if b == 0 { self.salt.clone() } else { Vec::new() };
            if let Some(m) = &self.media {
                extra.extend(m.block_keys(b, block_tokens));
            }
            let hash = block_hash(self.hashes.last().copied(), &self.tokens[b * block_tokens..(b + 1) * block_tokens], &extra);
            self.hashes.push(hash);
        }
    }
}

/// One sequence's work in a step: compute `tokens[start..start + len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: u64,
    pub start: usize,
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// Counters since the model was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub preemptions: u64,
    /// Admissions that looked up the prefix cache, and the prompt tokens they looked up.
    pub prefix_queries: u64,
    pub prefix_query_tokens: u64,
    /// Prompt tokens found in the cache (not computed).
    pub prefix_hit_tokens: u64,
    /// Tokens computed as prompt (prefill, recomputation included) and as decode rows.
    pub prefilled_tokens: u64,
    pub decoded_tokens: u64,
}

pub struct Scheduler {
    pub pool: BlockPool,
    pub limits: Limits,
    seqs: HashMap<u64, SeqState>,
    waiting: VecDeque<u64>,
    /// In admission order.
    running: Vec<u64>,
    pub counters: Counters,
}

impl Scheduler {
    pub fn new(pool: BlockPool, limits: Limits) -> Self {
        Self { pool, limits, seqs: HashMap::new(), waiting: VecDeque::new(), running: Vec::new(), counters: Counters::default() }
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.pool.block_tokens())
    }

    pub fn add(&mut self, seq: SeqState) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    pub fn seq(&self, id: u64) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.seqs.keys().copied().collect()
    }

    /// Removes a sequence (finished, cancelled or failed), freeing its blocks.
    pub fn remove(&mut self, id: u64) -> Option<SeqState> {
        let mut seq = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        Self::free_blocks(&mut self.pool, &mut seq);
        Some(seq)
    }

    /// Last blocks first, so a prefix's tail is evicted before its head.
    fn free_blocks(pool: &mut BlockPool, seq: &mut SeqState) {
        for &b in seq.blocks.iter().rev() {
            pool.release(b);
        }
        seq.blocks.clear();
        seq.computed = 0;
        seq.registered = 0;
    }

    /// Grows `id`'s table to hold `tokens` tokens; false (nothing taken) when too few blocks
    /// are free.
    fn grow(&mut self, id: u64, tokens: usize) -> bool {
        let want = self.blocks_for(tokens);
        let Some(seq) = self.seqs.get_mut(&id) else { return false };
        let missing = want.saturating_sub(seq.blocks.len());
        match self.pool.allocate_n(missing) {
            Some(new) => {
                seq.blocks.extend(new);
                true
            }
            None => false,
        }
    }

    fn preempt(&mut self, id: u64) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            Self::free_blocks(&mut self.pool, seq);
        }
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
    }

    /// The hashes of the full blocks `id` fills by computing `tokens[start..start + n]`.
    fn filled_hashes(&mut self, id: u64, start: usize, n: usize) -> Vec<BlockHash> {
        let bt = self.pool.block_tokens();
        let Some(seq) = self.seqs.get_mut(&id) else { return Vec::new() };
        seq.extend_hashes(bt);
        let (first, end) = (start / bt, ((start + n) / bt).min(seq.hashes.len()));
        seq.hashes.get(first..end).map(<[BlockHash]>::to_vec).unwrap_or_default()
    }

    /// Takes back the longest cached prefix of full blocks (leaving at least the last prompt
    /// token to compute, whose logits are needed).
    fn reuse_prefix(&mut self, id: u64) {
        let bt = self.pool.block_tokens();
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        if !seq.blocks.is_empty() || seq.computed > 0 {
            return;
        }
        seq.cached_tokens = 0;
        if !seq.reuse_prefix || !self.pool.prefix_caching() {
            return;
        }
        seq.extend_hashes(bt);
        let usable = (seq.tokens.len() - 1) / bt;
        self.counters.prefix_queries += 1;
        self.counters.prefix_query_tokens += seq.tokens.len() as u64;
        for &h in seq.hashes.iter().take(usable) {
            match self.pool.take_cached(h) {
                Some(b) => seq.blocks.push(b),
                None => break,
            }
        }
        seq.computed = seq.blocks.len() * bt;
        seq.registered = seq.blocks.len();
        seq.cached_tokens = seq.computed;
        self.counters.prefix_hit_tokens += seq.computed as u64;
    }

    /// This step's work. Empty when nothing can run.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.limits.max_num_batched_tokens;
        let mut out: Vec<Scheduled> = Vec::new();
        let mut done: HashSet<u64> = HashSet::new();
        let mut preempted = false;
        // Blocks this step computes, by hash.
        let mut in_flight: HashSet<BlockHash> = HashSet::new();
        // Decode rows first, then unfinished prompts, each in admission order.
        let mut order: Vec<u64> = self.running.clone();
        order.sort_by_key(|id| self.seqs.get(id).is_none_or(|s| s.tokens.len() - s.computed > 1));
        for id in order {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted earlier in this step
            }
            let Some(seq) = self.seqs.get(&id) else { continue };
            let need = seq.tokens.len() - seq.computed;
            if need == 0 {
                // Its last step picks its last token (a step in flight): nothing to compute.
                continue;
            }
            let cap = if seq.chunk == 0 { need } else { seq.chunk };
            let n = need.min(cap).min(budget);
            let start = seq.computed;
            let mut fits = true;
            while !self.grow(id, start + n) {
                // The most recently admitted sequence not yet scheduled (possibly this one).
                let victim = self.running.iter().rev().find(|r| !done.contains(r)).copied();
                match victim {
                    Some(v) => {
                        self.preempt(v);
                        preempted = true;
                        if v == id {
                            fits = false;
                            break;
                        }
                    }
                    None => {
                        fits = false;
                        break;
                    }
                }
            }
            if !fits {
                continue;
            }
            done.insert(id);
            if self.pool.prefix_caching() {
                in_flight.extend(self.filled_hashes(id, start, n));
            }
            out.push(Scheduled { id, start, len: n });
            budget -= n;
        }
        if !preempted {
            while budget > 0 && self.running.len() < self.limits.max_num_seqs {
                let Some(&id) = self.waiting.front() else { break };
                self.reuse_prefix(id);
                let Some(seq) = self.seqs.get(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                let usable = (seq.tokens.len() - 1) / self.pool.block_tokens();
                if seq.reuse_prefix && seq.blocks.len() < usable && seq.hashes.get(seq.blocks.len()).is_some_and(|h| in_flight.contains(h)) {
                    // Its next block is computed this step: take it from the cache next step.
                    if let Some(seq) = self.seqs.get_mut(&id) {
                        Self::free_blocks(&mut self.pool, seq);
                    }
                    break;
                }
                let need = seq.tokens.len() - seq.computed;
                let n = if seq.chunk > 0 {
                    need.min(seq.chunk).min(budget)
                } else if need <= budget || out.is_empty() {
                    // Unchunked: the whole rest in one step (alone, if it is over the budget).
                    need
                } else {
                    break;
                };
                let start = seq.computed;
                if !self.grow(id, start + n) {
                    // Give back what the lookup took, so those blocks stay evictable.
                    if let Some(seq) = self.seqs.get_mut(&id) {
                        Self::free_blocks(&mut self.pool, seq);
                    }
                    break;
                }
                self.waiting.pop_front();
                self.running.push(id);
                if self.pool.prefix_caching() {
                    in_flight.extend(self.filled_hashes(id, start, n));
                }
                out.push(Scheduled { id, start, len: n });
                budget = budget.saturating_sub(n);
            }
        }
        // Decode rows (one token) first: the runner's flat batch needs them so.
        out.sort_by_key(|s| s.len > 1);
        out
    }

    /// Records that a step computed `work`: caches the blocks it filled.
    pub fn computed(&mut self, work: &[Scheduled]) {
        let bt = self.pool.block_tokens();
        for w in work {
            let Some(seq) = self.seqs.get_mut(&w.id) else { continue };
            // The prompt's tokens (everything before the last known token is prompt or
            // already generated; a one-token step after the prompt is a decode row).
            if w.len == 1 && w.start + 1 == seq.tokens.len() && w.start > 0 {
                self.counters.decoded_tokens += 1;
            } else {
                self.counters.prefilled_tokens += w.len as u64;
            }
            seq.computed = w.start + w.len;
            seq.extend_hashes(bt);
            let full = (seq.computed / bt).min(seq.hashes.len()).min(seq.blocks.len());
            for i in seq.registered..full {
                self.pool.register(seq.blocks[i], seq.hashes[i]);
            }
            seq.registered = seq.registered.max(full);
        }
    }

    /// Appends a sampled token to `id`.
    pub fn push_token(&mut self, id: u64, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Appends a placeholder for the token a step in flight picks for `id` on the device, so
    /// that the next step can be scheduled (and queued) before it is known.
    pub fn push_placeholder(&mut self, id: u64) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(0);
            seq.pending += 1;
        }
    }

    /// Fills the first placeholder of `id`, at `position`, with the token picked there; false
    /// when `id` has no placeholder there (it is gone, or the token was never a placeholder).
    pub fn set_token(&mut self, id: u64, position: usize, token: u32) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else { return false };
        if seq.pending == 0 || position != seq.tokens.len() - seq.pending {
            return false;
        }
        seq.tokens[position] = token;
        seq.pending -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_grow_one_block_at_a_time_and_equal_the_whole_chain() {
        let tokens: Vec<u32> = (0..70).map(|i| i * 7 % 13).collect();
        let mut seq = SeqState::new(1, tokens[..5].to_vec(), 8, true, b"salt".to_vec());
        for &t in &tokens[5..] {
            seq.tokens.push(t);
            seq.extend_hashes(4);
        }
        assert_eq!(seq.hashes, super::super::block_pool::block_hashes(&tokens[..68], 4, b"salt"));
        assert_eq!(seq.hashes.len(), 17);
    }

    fn scheduler(blocks: usize, bt: usize, seqs: usize, tokens: usize) -> Scheduler {
        Scheduler::new(BlockPool::new(blocks, bt, true), Limits { max_num_seqs: seqs, max_num_batched_tokens: tokens })
    }

    /// Runs steps, appending token 1 to every sequence whose prompt is done, until each has
    /// `total` tokens; returns the steps.
    fn run(s: &mut Scheduler, total: usize) -> Vec<Vec<Scheduled>> {
        let mut steps = Vec::new();
        for _ in 0..1000 {
            if s.is_idle() {
                break;
            }
            let work = s.schedule();
            assert!(!work.is_empty(), "a step with nothing to do while sequences remain");
            s.computed(&work);
            for w in &work {
                let seq = s.seq(w.id).expect("seq");
                if seq.computed == seq.tokens.len() {
                    if seq.tokens.len() >= total {
                        s.remove(w.id);
                    } else {
                        s.push_token(w.id, 1);
                    }
                }
            }
            steps.push(work);
        }
        assert!(s.is_idle(), "did not finish");
        steps
    }

    #[test]
    fn decodes_go_first_and_long_prompts_are_chunked_into_the_budget() {
        let mut s = scheduler(64, 4, 8, 8);
        s.add(SeqState::new(1, vec![7; 3], 8, true, vec![]));
        let first = s.schedule();
        assert_eq!(first, vec![Scheduled { id: 1, start: 0, len: 3 }]);
        s.computed(&first);
        s.push_token(1, 9);
        // A 20-token prompt arrives: seq 1 decodes, the prompt fills the other 7 tokens.
        s.add(SeqState::new(2, vec![5; 20], 8, true, vec![]));
        let step = s.schedule();
        assert_eq!(step, vec![Scheduled { id: 1, start: 3, len: 1 }, Scheduled { id: 2, start: 0, len: 7 }]);
        s.computed(&step);
        s.push_token(1, 9);
        let step = s.schedule();
        assert_eq!(step, vec![Scheduled { id: 1, start: 4, len: 1 }, Scheduled { id: 2, start: 7, len: 7 }]);
    }

    #[test]
    fn the_sequence_cap_holds_later_requests_back() {
        let mut s = scheduler(64, 4, 2, 64);
        for id in 1..=3 {
            s.add(SeqState::new(id, vec![1, 2, 3], 0, true, vec![]));
        }
        let step = s.schedule();
        assert_eq!(step.iter().map(|w| w.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((s.running(), s.waiting()), (2, 1));
    }

    #[test]
    fn a_shared_prefix_is_computed_once() {
        let mut s = scheduler(64, 4, 8, 64);
        let prompt = |tail: u32| -> Vec<u32> { (0..10).chain([tail]).collect() };
        s.add(SeqState::new(1, prompt(100), 0, true, vec![]));
        let step = s.schedule();
        s.computed(&step);
        // Same first 10 tokens: two full blocks (8 tokens) come from the cache.
        s.add(SeqState::new(2, prompt(200), 0, true, vec![]));
        let step = s.schedule();
        assert!(step.contains(&Scheduled { id: 2, start: 8, len: 3 }), "{step:?}");
        assert_eq!(s.seq(2).expect("seq").cached_tokens, 8);
        assert_eq!(s.seq(1).expect("1").blocks[..2], s.seq(2).expect("2").blocks[..2]);
        assert_eq!(s.counters.prefix_hit_tokens, 8);
        // Another tenant's salt finds nothing.
        s.add(SeqState::new(3, prompt(300), 0, true, b"other".to_vec()));
        let step = s.schedule();
        assert!(step.contains(&Scheduled { id: 3, start: 0, len: 11 }), "{step:?}");
        // Scoring (every position's logits) never skips tokens.
        s.add(SeqState::new(4, prompt(100), 0, false, vec![]));
        let step = s.schedule();
        assert!(step.contains(&Scheduled { id: 4, start: 0, len: 11 }), "{step:?}");
    }

    #[test]
    fn prompts_sharing_a_prefix_that_arrive_together_compute_it_once() {
        let mut s = scheduler(64, 4, 8, 64);
        let prompt = |tail: u32| -> Vec<u32> { (0..10).chain([tail]).collect() };
        for id in 1..=3 {
            s.add(SeqState::new(id, prompt(100 + id as u32), 0, true, vec![]));
        }
        // The first computes the shared blocks; the others wait a step for them.
        let step = s.schedule();
        assert_eq!(step, vec![Scheduled { id: 1, start: 0, len: 11 }]);
        s.computed(&step);
        let step = s.schedule();
        assert!(step.contains(&Scheduled { id: 2, start: 8, len: 3 }) && step.contains(&Scheduled { id: 3, start: 8, len: 3 }), "{step:?}");
        assert_eq!(s.counters.prefix_hit_tokens, 16);
        assert_eq!(s.counters.prefilled_tokens, 11);
        // With prefix caching off nobody waits.
        let mut s = Scheduler::new(BlockPool::new(64, 4, false), Limits { max_num_seqs: 8, max_num_batched_tokens: 64 });
        for id in 1..=3 {
            s.add(SeqState::new(id, prompt(100 + id as u32), 0, true, vec![]));
        }
        assert_eq!(s.schedule().len(), 3);
    }

    #[test]
    fn a_whole_prompt_in_the_cache_still_computes_its_last_token() {
        let mut s = scheduler(16, 4, 8, 64);
        s.add(SeqState::new(1, (0..8).collect(), 0, true, vec![]));
        let step = s.schedule();
        s.computed(&step);
        s.remove(1);
        s.add(SeqState::new(2, (0..8).collect(), 0, true, vec![]));
        assert_eq!(s.schedule(), vec![Scheduled { id: 2, start: 4, len: 4 }]);
    }

    #[test]
    fn too_few_blocks_preempt_the_latest_and_everything_still_finishes() {
        // 6 blocks of 2 tokens; four sequences that each grow to 8 tokens (4 blocks).
        let mut s = scheduler(6, 2, 4, 64);
        for id in 1..=4 {
            s.add(SeqState::new(id, vec![id as u32; 3], 0, true, vec![]));
        }
        let steps = run(&mut s, 8);
        assert!(s.counters.preemptions > 0);
        assert_eq!(s.pool.used(), 0);
        // No step ever asked for more blocks than exist (the pool would have refused).
        assert!(steps.iter().all(|w| w.len() <= 4));
    }

    #[test]
    fn placeholders_schedule_the_next_step_but_are_never_cached() {
        let mut s = scheduler(16, 4, 8, 64);
        s.add(SeqState::new(1, vec![1, 2, 3], 0, true, vec![]));
        let step = s.schedule();
        s.computed(&step);
        // The step in flight picks token 3's successor: the next step is scheduled already.
        s.push_placeholder(1);
        let next = s.schedule();
        assert_eq!(next, vec![Scheduled { id: 1, start: 3, len: 1 }]);
        s.computed(&next);
        // The first block (tokens 0..4) ends with the placeholder: not cached yet.
        assert_eq!(s.pool.cached_blocks(), 0);
        assert!(!s.set_token(1, 2, 9), "position 2 is no placeholder");
        assert!(s.set_token(1, 3, 4));
        s.push_token(1, 5);
        let step = s.schedule();
        s.computed(&step);
        assert_eq!(s.pool.cached_blocks(), 1);
        // A second request with the same first block finds it, holding the real token.
        s.add(SeqState::new(2, vec![1, 2, 3, 4, 6], 0, true, vec![]));
        let step = s.schedule();
        assert!(step.contains(&Scheduled { id: 2, start: 4, len: 1 }), "{step:?}");
        // A sequence whose last token is being picked by its last step has nothing to compute.
        s.add(SeqState::new(3, vec![7, 7], 0, true, vec![]));
        let step = s.schedule();
        s.computed(&step);
        assert!(!s.schedule().iter().any(|w| w.id == 3));
    }

    #[test]
    fn an_unchunked_prompt_over_the_budget_runs_alone() {
        let mut s = scheduler(64, 4, 4, 8);
        s.add(SeqState::new(1, vec![1; 20], 0, true, vec![]));
        s.add(SeqState::new(2, vec![1; 3], 0, true, vec![]));
        assert_eq!(s.schedule(), vec![Scheduled { id: 1, start: 0, len: 20 }]);
    }
}
