//! Sizing the paged KV pool: from an explicit budget, or from the memory actually available
//! (the host's for the CPU backend; for the GPU's the device memory left after loading and its
//! largest binding) and the concurrency asked for, so that `max_batch` sequences at the full
//! context fit when memory allows and the pool never claims more than its share.

/// What the pool was sized from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolBudget {
    /// An explicit size in bytes (`--kv-cache-mb N`).
    Bytes(usize),
    /// Automatic: at most this many bytes (a share of the memory available), no more than
    /// `max_batch` full-context sequences need.
    Auto(usize),
}

/// The pool's size and how it came about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSize {
    /// Blocks in the pool.
    pub blocks: usize,
    /// Bytes the pool takes.
    pub bytes: usize,
    /// Sequences the pool holds at the full context.
    pub full_sequences: usize,
    /// Why the pool has this size, for the start-up report.
    pub reason: String,
}

/// Sizes a pool of blocks of `block_size` positions taking `block_bytes` each, for `max_batch`
/// sequences of up to `context` positions, within `budget` and the backend's `max_blocks`.
pub fn size_pool(
    block_bytes: usize,
    block_size: usize,
    max_batch: usize,
    context: usize,
    budget: PoolBudget,
    max_blocks: usize,
) -> PoolSize {
    let block_bytes = block_bytes.max(1);
    let per_seq = context.div_ceil(block_size.max(1)).max(1);
    let full = per_seq.saturating_mul(max_batch.max(1));
    let (cap, mut reason) = match budget {
        PoolBudget::Bytes(b) => (b / block_bytes, format!("{} MiB asked", b >> 20)),
        PoolBudget::Auto(b) if b / block_bytes >= full => (
            full,
            format!("{max_batch} sequences at the full context of {context}"),
        ),
        PoolBudget::Auto(b) => (
            b / block_bytes,
            format!(
                "{} MiB available (too little for {max_batch} sequences at the full context)",
                b >> 20
            ),
        ),
    };
    let mut blocks = cap.max(1);
    if blocks > max_blocks {
        blocks = max_blocks.max(1);
        reason.push_str(", limited by the device's largest binding");
    }
    PoolSize {
        blocks,
        bytes: blocks * block_bytes,
        full_sequences: blocks / per_seq,
        reason,
    }
}

/// Bytes of host memory available now (`MemAvailable` of /proc/meminfo), if known.
pub fn host_available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_what_the_batch_needs_when_memory_allows() {
        // 64 sequences × 512 positions in blocks of 16: 2,048 blocks of 1 KiB.
        let s = size_pool(1024, 16, 64, 512, PoolBudget::Auto(1 << 30), usize::MAX);
        assert_eq!((s.blocks, s.bytes, s.full_sequences), (2048, 2 << 20, 64));
        assert!(s.reason.contains("64 sequences"), "{}", s.reason);
        // Too little memory: what fits, and the report says so.
        let s = size_pool(1024, 16, 64, 512, PoolBudget::Auto(320 << 10), usize::MAX);
        assert_eq!((s.blocks, s.full_sequences), (320, 10));
        assert!(s.reason.contains("too little"), "{}", s.reason);
        // The device's binding limit wins over both.
        let s = size_pool(1024, 16, 64, 512, PoolBudget::Auto(1 << 30), 100);
        assert_eq!((s.blocks, s.full_sequences), (100, 3));
        assert!(s.reason.contains("binding"), "{}", s.reason);
    }

    #[test]
    fn an_explicit_budget_is_taken_as_asked() {
        let s = size_pool(
            1 << 20,
            16,
            8,
            4096,
            PoolBudget::Bytes(64 << 20),
            usize::MAX,
        );
        assert_eq!((s.blocks, s.full_sequences), (64, 0));
        assert!(s.reason.contains("64 MiB"));
        // Never an empty pool, whatever the inputs.
        let s = size_pool(0, 0, 0, 0, PoolBudget::Bytes(0), 0);
        assert_eq!(s.blocks, 1);
    }

    #[test]
    fn host_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(host_available_bytes().is_some_and(|b| b > 0));
        }
    }
}
