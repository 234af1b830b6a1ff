//! The paged KV cache's bookkeeping: which blocks are free, which are shared, and which hold a
//! known prefix (vLLM v1 `block_pool.py` and `kv_cache_utils.py`; the blocks' tensors live in
//! [`crate::decoder::KvPool`]).
//!
//! Every block has a reference count. A block whose count drops to zero goes to the free queue
//! but keeps its content hash, so a later request with the same prefix can take it back until
//! it is evicted: allocation takes the least recently freed block (LRU), and blocks that hold
//! no hash are handed out before any that do. A full block's hash chains its parent's hash,
//! its token ids and extra keys (a tenant salt, image content hashes), so equal hashes mean
//! equal prefixes (SHA-256, truncated to 128 bits).

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;
pub type BlockHash = u128;

/// The hash of a full block after `parent` (`None` for the first block) with its `extra`
/// keys: the first block takes the tenant salt, which separates tenants' caches (every later
/// block chains it), and any block the keys of the images whose tokens fall in it.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32], extra: &[u8]) -> BlockHash {
    let mut h = Sha256::new();
    match parent {
        Some(p) => h.update(p.to_le_bytes()),
        None => h.update(b"root"),
    }
    h.update((extra.len() as u64).to_le_bytes());
    h.update(extra);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(out)
}

/// The chained hashes of every full block of `tokens`, the first keyed by `salt`.
pub fn block_hashes(tokens: &[u32], block_tokens: usize, salt: &[u8]) -> Vec<BlockHash> {
    let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_tokens);
    for chunk in tokens.chunks_exact(block_tokens) {
        out.push(block_hash(out.last().copied(), chunk, if out.is_empty() { salt } else { &[] }));
    }
    out
}

pub struct BlockPool {
    block_tokens: usize,
    refs: Vec<u32>,
    hashes: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    /// Free blocks by eviction order: lowest key first. Blocks without a hash get keys below
    /// zero (taken first), hashed ones keys above (least recently freed first).
    free: BTreeMap<i64, BlockId>,
    free_key: Vec<Option<i64>>,
    next_front: i64,
    next_back: i64,
    prefix_caching: bool,
}

impl BlockPool {
    pub fn new(blocks: usize, block_tokens: usize, prefix_caching: bool) -> Self {
        let mut pool = Self {
            block_tokens,
            refs: vec![0; blocks],
            hashes: vec![None; blocks],
            cached: HashMap::new(),
            free: BTreeMap::new(),
            free_key: vec![None; blocks],
            next_front: -1,
            next_back: 0,
            prefix_caching,
        };
        for b in 0..blocks as BlockId {
            pool.push_free(b);
        }
        pool
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used(&self) -> usize {
        self.total() - self.free_blocks()
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Switches prefix caching; off, every cached hash is forgotten (the blocks stay).
    pub fn set_prefix_caching(&mut self, on: bool) {
        if self.prefix_caching && !on {
            self.cached.clear();
            self.hashes.iter_mut().for_each(|h| *h = None);
        }
        self.prefix_caching = on;
    }

    fn push_free(&mut self, b: BlockId) {
        let key = if self.hashes[b as usize].is_some() {
            self.next_back += 1;
            self.next_back
        } else {
            self.next_front -= 1;
            self.next_front
        };
        self.free.insert(key, b);
        self.free_key[b as usize] = Some(key);
    }

    /// A fresh block (reference count 1), evicting the hash it held; `None` when none is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (_, b) = self.free.pop_first()?;
        self.free_key[b as usize] = None;
        if let Some(h) = self.hashes[b as usize].take()
            && self.cached.get(&h) == Some(&b)
        {
            self.cached.remove(&h);
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// `n` fresh blocks, or none at all when fewer are free.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free_blocks() < n {
            return None;
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// The cached block holding `hash`, now referenced once more (taken off the free queue if
    /// it was there).
    pub fn take_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        if !self.prefix_caching {
            return None;
        }
        let b = *self.cached.get(&hash)?;
        if let Some(key) = self.free_key[b as usize].take() {
            self.free.remove(&key);
        }
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Drops one reference; at zero the block is free (its hash kept until evicted).
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than taken");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.push_free(b);
        }
    }

    /// Records that full block `b` holds the prefix `hash` (no-op when caching is off or
    /// another block already holds it).
    pub fn register(&mut self, b: BlockId, hash: BlockHash) {
        if !self.prefix_caching || self.hashes[b as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hashes[b as usize] = Some(hash);
        self.cached.insert(hash, b);
    }

    /// Blocks currently holding a known prefix (free or not).
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_prefixes_and_salts() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, b"");
        let b = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 9], 4, b"");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // The same second block after another first block differs.
        let c = block_hashes(&[0, 2, 3, 4, 5, 6, 7, 8], 4, b"");
        assert_ne!(a[1], c[1]);
        // A salt separates caches.
        assert_ne!(block_hashes(&[1, 2, 3, 4], 4, b"tenant-a")[0], a[0]);
    }

    #[test]
    fn freed_blocks_keep_their_prefix_until_evicted_least_recent_first() {
        let mut pool = BlockPool::new(3, 4, true);
        let (x, y, z) = (pool.allocate().expect("x"), pool.allocate().expect("y"), pool.allocate().expect("z"));
        assert_eq!(pool.allocate(), None);
        pool.register(x, 10);
        pool.register(y, 11);
        pool.release(x);
        pool.release(y);
        pool.release(z);
        assert_eq!(pool.used(), 0);
        // The unhashed block goes first; then the least recently freed (x).
        assert_eq!(pool.allocate(), Some(z));
        assert_eq!(pool.take_cached(11), Some(y));
        assert_eq!(pool.allocate(), Some(x));
        assert_eq!(pool.take_cached(10), None, "x was evicted");
        assert_eq!(pool.cached_blocks(), 1);
        // A shared block is freed only when its last reference goes.
        assert_eq!(pool.take_cached(11), Some(y));
        pool.release(y);
        assert_eq!(pool.free_blocks(), 0);
        pool.release(y);
        assert_eq!(pool.free_blocks(), 1);
    }

    #[test]
    fn without_prefix_caching_nothing_is_found() {
        let mut pool = BlockPool::new(2, 4, false);
        let x = pool.allocate().expect("x");
        pool.register(x, 5);
        pool.release(x);
        assert_eq!(pool.take_cached(5), None);
        assert_eq!(pool.allocate_n(3), None);
        assert_eq!(pool.allocate_n(2).map(|v| v.len()), Some(2));
    }
}
