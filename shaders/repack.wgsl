// Checkpoint-packed ternary codes -> the matmul kernels' word layout (see matmul_io.wgsl), on
// the device: the host uploads the packed tensor as it is and nothing is repacked on the CPU.
//
// Checkpoint packing: bytes [rows / 4][cols]; row r's code of column c is bits
// 2 (r / (rows / 4)) of byte (r % (rows / 4)) * cols + c. Output: `kvec * 4` words per row,
// column 16 k + 4 s + b of a row at bits 8 b + 2 s of its word k; columns past `cols` stay 0.
// Dispatch: (ceil(kvec * 4 / 64), rows of this slice); row `rbase + y` of the matrix goes to
// output row `row0 + rbase + y`.

struct RepackP {
    rows: u32,  // rows of the packed matrix
    cols: u32,
    kvec: u32,  // vec4<u32> per output row
    row0: u32,  // first output row of the matrix (a part of a fused matrix)
    rbase: u32, // first matrix row of this dispatch (dispatches cover at most 65535 rows)
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: RepackP;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn byte_at(i: u32) -> u32 {
    return (src[i >> 2u] >> (8u * (i & 3u))) & 0xffu;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let words = p.kvec * 4u;
    let k = gid.x;
    let r = p.rbase + gid.y;
    if k >= words || r >= p.rows {
        return;
    }
    let r4 = p.rows / 4u;
    let base = (r % r4) * p.cols;
    let shift = 2u * (r / r4);
    var word = 0u;
    for (var j = 0u; j < 16u; j = j + 1u) {
        let c = k * 16u + j;
        if c < p.cols {
            let code = (byte_at(base + c) >> shift) & 3u;
            word = word | (code << (8u * (j % 4u) + 2u * (j / 4u)));
        }
    }
    dst[(p.row0 + r) * words + k] = word;
}
