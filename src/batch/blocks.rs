//! The paged KV cache's block bookkeeping: fixed-size blocks shared by all sequences, reference
//! counted, with full prompt blocks remembered by the hash of their whole token prefix so that
//! later sequences with the same prefix reuse them instead of recomputing.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Allocation state of the pool's blocks.
pub struct BlockAllocator {
    block_size: usize,
    refs: Vec<u32>,
    free: Vec<u32>,
    /// Prefix hash -> block holding that prefix's last `block_size` positions.
    by_hash: HashMap<u64, u32>,
    hash_of: Vec<Option<u64>>,
    /// Released blocks still holding a cached prefix, oldest first (entries may be stale).
    lru: VecDeque<u32>,
    used: usize,
    cached_idle: usize,
    shared: usize,
}

/// The hashes of the full `block_size` blocks of `tokens`, each covering the whole prefix up to
/// its block's end.
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut h = 0u64;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let mut s = DefaultHasher::new();
            h.hash(&mut s);
            block.hash(&mut s);
            h = s.finish();
            h
        })
        .collect()
}

impl BlockAllocator {
    /// `blocks` free blocks of `block_size` positions.
    pub fn new(blocks: usize, block_size: usize) -> Self {
        BlockAllocator {
            block_size,
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; blocks],
            lru: VecDeque::new(),
            used: 0,
            cached_idle: 0,
            shared: 0,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Blocks referenced by more than one sequence (prefixes shared, e.g. by a request's `n`
    /// choices).
    pub fn shared(&self) -> usize {
        self.shared
    }

    /// Unreferenced blocks that still hold a reusable prefix.
    pub fn cached(&self) -> usize {
        self.cached_idle
    }

    /// Blocks an allocation can get now (free, or idle cached ones it may evict).
    pub fn available(&self) -> usize {
        self.free.len() + self.cached_idle
    }

    /// A block for one sequence (reference count 1), evicting the oldest idle cached prefix
    /// when no block is free.
    pub fn alloc(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => loop {
                let b = self.lru.pop_front()?;
                if self.refs[b as usize] == 0 {
                    if let Some(h) = self.hash_of[b as usize].take() {
                        self.by_hash.remove(&h);
                        self.cached_idle -= 1;
                        break b;
                    }
                }
            },
        };
        self.refs[b as usize] = 1;
        self.used += 1;
        Some(b)
    }

    /// Drops one reference to `b`.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "release of a free block");
        *r -= 1;
        if *r == 1 {
            self.shared -= 1;
        }
        if *r > 0 {
            return;
        }
        self.used -= 1;
        if self.hash_of[b as usize].is_some() {
            self.cached_idle += 1;
            self.lru.push_back(b);
        } else {
            self.free.push(b);
        }
    }

    /// The cached block of prefix `hash`, with a new reference, if there is one.
    pub fn lookup(&mut self, hash: u64) -> Option<u32> {
        let b = *self.by_hash.get(&hash)?;
        let r = &mut self.refs[b as usize];
        if *r == 0 {
            self.cached_idle -= 1;
            self.used += 1;
        }
        *r += 1;
        if *r == 2 {
            self.shared += 1;
        }
        Some(b)
    }

    /// How many leading blocks of `hashes` are cached (without taking references).
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Remembers that `b` (referenced) holds the prefix of `hash`.
    pub fn register(&mut self, b: u32, hash: u64) {
        if self.hash_of[b as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, b);
        self.hash_of[b as usize] = Some(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_counted_reused_and_evicted() {
        let mut a = BlockAllocator::new(3, 4);
        let hs = prefix_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(hs.len(), 2);
        assert_ne!(prefix_hashes(&[9, 2, 3, 4, 5, 6, 7, 8], 4)[1], hs[1]);
        let b0 = a.alloc().unwrap();
        let b1 = a.alloc().unwrap();
        a.register(b0, hs[0]);
        a.register(b1, hs[1]);
        assert_eq!((a.used(), a.available()), (2, 1));
        a.release(b0);
        a.release(b1);
        assert_eq!((a.used(), a.cached(), a.available()), (0, 2, 3));
        assert_eq!(a.cached_prefix(&hs), 2);
        assert_eq!(a.lookup(hs[0]), Some(b0));
        assert_eq!((a.used(), a.cached(), a.shared()), (1, 1, 0));
        assert_eq!(a.lookup(hs[0]), Some(b0));
        assert_eq!(a.shared(), 1);
        a.release(b0);
        assert_eq!((a.used(), a.shared()), (1, 0));
        // Free block first, then the idle cached one (b1); b0 is referenced.
        let c = a.alloc().unwrap();
        assert!(c != b0 && c != b1);
        assert_eq!(a.alloc(), Some(b1));
        assert_eq!(a.cached_prefix(&hs), 1);
        assert_eq!(a.alloc(), None);
        a.release(b0);
        a.release(b1);
        a.release(c);
        assert_eq!((a.used(), a.available()), (0, 3));
    }
}
