// Shared declarations, prepended to every kernel by src/gpu/pipelines.rs.

// Per-step values, written once per submit with queue.write_buffer.
struct Step {
    t: u32,      // tokens in the step
    pos: u32,    // position of the step's first token
    chunk: u32,  // attention: positions per split
    nsplit: u32, // attention: splits of the longest row
    cap: u32,    // KV cache capacity (positions)
    row0: u32,   // head: first step row of this logits batch
    nrows: u32,  // head: rows in this logits batch
    pad: u32,
}

// A lower bound that is finite (WGSL has no infinity literal).
const NEG_BIG: f32 = -3.0e38;

// `v` rounded to f32 as it is: `zero` (0, read from a uniform) hides that from the compiler, so a
// following add is not contracted with the multiply that produced `v` into one FMA (Vulkan on
// NVIDIA does that), which would round differently from the CPU backend's separate operations.
fn rounded(v: f32, zero: u32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) | zero);
}
