//! The key/value cache of a batch of sequences that advance together.
//!
//! Rows are left-padded to a common length; `pads[b]` slots at the start of row `b` hold no
//! token and are masked out of attention. Each layer keeps `[batch, kv_heads, slots,
//! head_dim]` keys and values, where `slots` grows in whole blocks of [`BLOCK_TOKENS`] and new
//! tokens are written in place: attention sees the same shapes for a whole block (one set of
//! compiled, autotuned kernels instead of one per step), and unused slots are masked. Paged
//! attention with prefix sharing replaces this layout behind the same interface.

use burn::tensor::{IndexingUpdateOp, Int, Tensor};

/// Slots are allocated in blocks of this many tokens.
pub const BLOCK_TOKENS: usize = 256;

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

    /// Slots allocated once `tokens` more are stored: whole blocks, at most the capacity.
    pub fn slots_for(&self, tokens: usize) -> usize {
        (self.len + tokens).div_ceil(BLOCK_TOKENS).saturating_mul(BLOCK_TOKENS).min(self.capacity).max(self.len + tokens)
    }

    /// Writes this step's keys and values for `layer` at slots `len..len + t`; returns the
    /// whole allocated storage (`slots_for(t)` slots, those past `len + t` unused).
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [batch, heads, t, dim] = k.dims();
        let slots = self.slots_for(t);
        let (mut k_store, mut v_store) = match self.layers[layer].take() {
            Some((ks, vs)) if ks.dims()[2] == slots => (ks, vs),
            old => {
                let device = k.device();
                let zeros = || Tensor::<4>::zeros([batch, heads, slots, dim], (&device, k.dtype()));
                let (mut ks, mut vs) = (zeros(), zeros());
                if let Some((ko, vo)) = old {
                    let kept = ko.dims()[2].min(slots);
                    ks = ks.slice_assign([0..batch, 0..heads, 0..kept, 0..dim], ko.narrow(2, 0, kept));
                    vs = vs.slice_assign([0..batch, 0..heads, 0..kept, 0..dim], vo.narrow(2, 0, kept));
                }
                (ks, vs)
            }
        };
        let range = [0..batch, 0..heads, self.len..self.len + t, 0..dim];
        k_store = k_store.slice_assign(range.clone(), k);
        v_store = v_store.slice_assign(range, v);
        self.layers[layer] = Some((k_store.clone(), v_store.clone()));
        (k_store, v_store)
    }

    /// Slots allocated now (0 before the first append).
    pub fn storage_slots(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    /// Writes one token's keys and values for `layer` at the slot held in `slot` (`[1]`, on
    /// the device) into the storage already allocated, in place; returns the whole storage.
    /// The step that calls this must not need more slots ([`Self::storage_slots`] ==
    /// [`Self::slots_for`]`(1)`): it is the device-resident decode step of
    /// [`crate::decode_graph`], whose slot index changes between replays without the host.
    /// `None` when the layer has no storage yet (nothing was prefilled).
    pub fn write_at(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>, slot: &Tensor<1, Int>) -> Option<(Tensor<4>, Tensor<4>)> {
        let (k_store, v_store) = self.layers.get_mut(layer)?.take()?;
        let k_store = k_store.select_assign(2, slot.clone(), k, IndexingUpdateOp::Assign);
        let v_store = v_store.select_assign(2, slot.clone(), v, IndexingUpdateOp::Assign);
        self.layers[layer] = Some((k_store.clone(), v_store.clone()));
        Some((k_store, v_store))
    }

    /// Whether every layer's storage is uniquely owned by the cache, so that writes land in
    /// place (what a captured graph, which replays against fixed buffers, relies on).
    pub fn storage_is_unique(&self) -> bool {
        self.layers.iter().flatten().all(|(k, v)| k.can_mut() && v.can_mut())
    }

    /// Marks `tokens` more slots as filled (after every layer appended them).
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
