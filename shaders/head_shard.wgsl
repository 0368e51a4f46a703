// One shard of the vocabulary rows of the output head (src/gpu/buffers.rs `Shard`).
struct Shard {
    row0: u32,
    rows: u32,
    cols: u32,
    row_words: u32,
    vocab: u32,
    hn_vec4: u32, // vec4 per row of the head's input (f32, or int8 for the int8 head)
    scale: f32,   // bf16 weights: a power of two that puts the largest below 2^15 (head_coop)
    unscale: f32, // 1 / scale
}
