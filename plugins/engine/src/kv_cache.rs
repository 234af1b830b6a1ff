//! The key/value cache of a batch of sequences that advance together.
//!
//! Rows are left-padded to a common length; `pads[b]` slots at the start of row `b` hold no
//! token and are masked out of attention. Each layer keeps `[batch, kv_heads, len, head_dim]`
//! keys and values, grown as tokens arrive. (Addressing by fixed-size blocks for paged
//! attention and prefix sharing replaces this layout behind the same interface.)

use burn::tensor::Tensor;

pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
    pads: Vec<usize>,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `pads.len()` rows, holding at most `capacity` slots per row.
    pub fn new(num_layers: usize, pads: Vec<usize>, capacity: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), len: 0, pads, capacity }
    }

    /// Slots filled per row (pads included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    pub fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Appends this step's keys and values for `layer`; returns everything cached so far.
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k_all, v_all) = match self.layers[layer].take() {
            None => (k, v),
            Some((k_old, v_old)) => (Tensor::cat(vec![k_old, k], 2), Tensor::cat(vec![v_old, v], 2)),
        };
        self.layers[layer] = Some((k_all.clone(), v_all.clone()));
        (k_all, v_all)
    }

    /// Marks `tokens` more slots as filled (after every layer appended them).
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
