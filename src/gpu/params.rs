//! The kernels' uniform parameters: each `#[repr(C)]` struct mirrors the WGSL struct of the
//! same name field for field (16-byte multiples, padding named), so Rust and WGSL name the
//! same values and a layout change is one edit on each side, checked by `sizes_match_wgsl`.

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
    /// Padding.
    pub pad: u32,
}

/// A ternary matmul's matrix (`MatP` in matmul.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct MatP {
    /// Output rows.
    pub rows: u32,
    /// vec4<u32> of weights per row.
    pub kvec: u32,
    /// f32 per output row.
    pub ld: u32,
    /// Padding.
    pub pad: u32,
}

/// An RMSNorm (+ quantization) (`NormP` in norm.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct NormP {
    /// Elements normalised.
    pub width: u32,
    /// f32 per source row.
    pub src_stride: u32,
    /// u32 per output row (int8 ×4, or f32).
    pub out_words: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
}

/// A fused norm + GEMV (`FusedP` in gemv_fused.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct FusedP {
    /// Output rows.
    pub rows: u32,
    /// vec4<u32> of weights per row.
    pub kvec: u32,
    /// f32 per output row.
    pub ld: u32,
    /// Input elements normalised.
    pub width: u32,
    /// f32 per source row.
    pub src_stride: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Query width (q heads × head_dim).
    pub q_dim: u32,
    /// Key/value width.
    pub kv_dim: u32,
    /// Head dimension.
    pub hd: u32,
    /// Padding.
    pub p0: u32,
    /// Padding.
    pub p1: u32,
    /// Padding.
    pub p2: u32,
}

/// RoPE + KV write of a contiguous cache (`RopeP` in rope.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct RopeP {
    /// Head dimension.
    pub hd: u32,
    /// Query heads.
    pub nh: u32,
    /// f32 per q|k|v row.
    pub stride: u32,
    /// Key/value width.
    pub kv_dim: u32,
}

/// Attention over a contiguous cache (`AttnP` in attention.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct AttnP {
    /// Head dimension.
    pub hd: u32,
    /// Query heads.
    pub nh: u32,
    /// Query heads per KV head.
    pub group: u32,
    /// f32 per q|k|v row.
    pub stride: u32,
    /// Query width.
    pub q_dim: u32,
    /// Partial slots per (token, head).
    pub maxsplit: u32,
    /// 1 / sqrt(head_dim).
    pub scale: f32,
    /// Padding.
    pub pad: u32,
}

/// RoPE, KV write and attention over the paged pool (`PagedP` in paged_rope.wgsl and
/// paged_attention.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct PagedP {
    /// Head dimension.
    pub hd: u32,
    /// Query heads.
    pub nh: u32,
    /// Query heads per KV head.
    pub group: u32,
    /// f32 per q|k|v row.
    pub stride: u32,
    /// Query width.
    pub q_dim: u32,
    /// Key/value width.
    pub kv_dim: u32,
    /// KV heads.
    pub kvh: u32,
    /// Positions per block.
    pub bs: u32,
    /// Block-table entries per sequence.
    pub tstride: u32,
    /// 1 / sqrt(head_dim).
    pub scale: f32,
    /// Padding.
    pub pad0: u32,
    /// Padding.
    pub pad1: u32,
}

/// One shard of the embedding or head (`Shard` in embed.wgsl and head_shard.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct ShardP {
    /// First vocabulary row held by this shard.
    pub row0: u32,
    /// Rows in this shard.
    pub rows: u32,
    /// Hidden size.
    pub cols: u32,
    /// u32 words per stored row (padded).
    pub row_words: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// vec4 per row of the final-normed activations.
    pub hn_vec4: u32,
    /// Padding.
    pub pad0: u32,
    /// Padding.
    pub pad1: u32,
}

/// Argmax over the logits (`ArgP` in argmax.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct ArgP {
    /// Logits.
    pub n: u32,
    /// Partial results.
    pub parts: u32,
    /// Padding.
    pub pad0: u32,
    /// Padding.
    pub pad1: u32,
}

/// One top-k pass (`TopkP` in topk.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct TopkP {
    /// Entries this pass reads.
    pub n: u32,
    /// Entries each workgroup keeps.
    pub k: u32,
    /// 1 / temperature (first pass).
    pub inv_t: f32,
    /// Padding.
    pub pad: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

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
            wgsl_bytes(&sh("matmul.wgsl"), "MatP")
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
