//! The step uniform every kernel reads, and the size check of every op's uniform struct: each
//! `#[repr(C)]` struct (here, or in its op's file under `ops/`) mirrors the WGSL struct of the
//! same name field for field (16-byte multiples, padding named), so a layout change is one
//! edit on each side, checked by `sizes_match_wgsl`.

use bytemuck::{Pod, Zeroable};

/// Per-step values (`Step` in common.wgsl), rewritten before each submission.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct Step {
    /// Tokens in the step.
    pub t: u32,
    /// Position of the step's first token.
    pub pos: u32,
    /// Attention: positions per split.
    pub chunk: u32,
    /// Attention: splits of the longest row.
    pub nsplit: u32,
    /// KV cache capacity (positions).
    pub cap: u32,
    /// Head: first step row of this logits batch.
    pub row0: u32,
    /// Head: rows in this logits batch.
    pub nrows: u32,
    /// Zero (kernels read it to keep the compiler from fusing roundings, see common.wgsl).
    pub pad: u32,
    /// Attention: most splits a row may take (the device recomputes `chunk` and `nsplit`
    /// from it when it moves a queued step's position, see accept.wgsl).
    pub most: u32,
    /// Padding.
    pub pad1: u32,
    /// Padding.
    pub pad2: u32,
    /// Padding.
    pub pad3: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::{argmax::ArgP, attention::AttnP, gemv_fused::FusedP, head::ShardP};
    use crate::gpu::ops::{matmul::MatP, norm::NormP, paged::PagedP, rope::RopeP, topk::TopkP};

    /// Bytes of the WGSL struct `name` in `src` (every field is 4 bytes).
    fn wgsl_bytes(src: &str, name: &str) -> usize {
        let start = src
            .find(&format!("struct {name} {{"))
            .unwrap_or_else(|| panic!("no struct {name}"));
        let body = &src[start..start + src[start..].find('}').unwrap()];
        4 * body.lines().filter(|l| l.contains(": ")).count()
    }

    #[test]
    fn sizes_match_wgsl() {
        let sh = |f: &str| std::fs::read_to_string(format!("shaders/{f}")).unwrap();
        let s = std::mem::size_of::<Step>;
        assert_eq!(s(), wgsl_bytes(&sh("common.wgsl"), "Step"));
        assert_eq!(
            std::mem::size_of::<MatP>(),
            wgsl_bytes(&sh("matmul_io.wgsl"), "MatP")
        );
        assert_eq!(
            std::mem::size_of::<NormP>(),
            wgsl_bytes(&sh("norm.wgsl"), "NormP")
        );
        let fused = wgsl_bytes(&sh("gemv_fused.wgsl"), "FusedP");
        assert_eq!(std::mem::size_of::<FusedP>(), fused);
        assert_eq!(
            std::mem::size_of::<RopeP>(),
            wgsl_bytes(&sh("rope.wgsl"), "RopeP")
        );
        let attn = wgsl_bytes(&sh("attention.wgsl"), "AttnP");
        assert_eq!(std::mem::size_of::<AttnP>(), attn);
        for f in ["paged_rope.wgsl", "paged_attention.wgsl"] {
            assert_eq!(std::mem::size_of::<PagedP>(), wgsl_bytes(&sh(f), "PagedP"));
        }
        for f in ["embed.wgsl", "head_shard.wgsl"] {
            assert_eq!(std::mem::size_of::<ShardP>(), wgsl_bytes(&sh(f), "Shard"));
        }
        assert_eq!(
            std::mem::size_of::<ArgP>(),
            wgsl_bytes(&sh("argmax.wgsl"), "ArgP")
        );
        assert_eq!(
            std::mem::size_of::<TopkP>(),
            wgsl_bytes(&sh("topk.wgsl"), "TopkP")
        );
    }
}
