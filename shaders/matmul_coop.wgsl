// The tensor-core GEMM (matmul_io.wgsl first; `enable f16; enable wgpu_cooperative_matrix;`
// before everything): cooperative 16x16x16 f16 x f16 + f32 matrices, exact because ternary
// weights and int8 activations are exact in f16, their products in f32, and every partial sum
// is an integer below 2^24 (|sum| <= K * 128 with K <= 130,000).
//
// Both operands are f16 copies in storage (widen.wgsl): the weights' rows (`rows` padded to a
// multiple of 128, K = kvec * 64 columns), the step's activation rows (K columns a token,
// allocated for a multiple of 64 tokens), so the loaders copy without converting. One
// 256-invocation workgroup (8 subgroups of 32) computes a 128-row x 64-token tile; subgroup s
// owns rows 32 (s % 4).. and tokens 32 (s / 4).. as 2 x 2 accumulator fragments. Per 32
// columns of K the invocations copy the tile's weight rows and activations into workgroup
// memory (the loads of the two following steps in flight meanwhile), then each subgroup
// multiplies 2 x (2 A + 2 B fragments). With several workgroups along z (split-K, for steps
// with few tiles) each sums its share of K into the i32 scratch and gemm_finish (matmul.wgsl)
// applies the epilogue. The sums leave through a per-subgroup 16 x 16 staging fragment.
// Dispatch: (ceil(rows / 128), ceil(T / 64), splits).

@group(0) @binding(2) var<storage, read> wh: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read> xh: array<vec4<f16>>;

// vec4<f16> per tile row: 32 columns + 8 of padding against bank conflicts.
const CS: u32 = 10u;
var<workgroup> ta: array<vec4<f16>, 1280>; // 128 weight rows x CS, row-major
var<workgroup> tb: array<vec4<f16>, 640>; // 64 tokens x CS (columns of B)
var<workgroup> tc: array<f32, 2048>; // one 16 x 16 fragment per subgroup, column-major

// Fragment `c` of subgroup `sg` (rows r, tokens t of the output) through the staging area.
fn emit(c: coop_mat16x16<f32, C>, sg: u32, lane: u32, r: u32, t: u32, split: bool) {
    coopStore(c, &tc[sg * 256u], 16u);
    workgroupBarrier();
    for (var j = 0u; j < 8u; j = j + 1u) {
        let i = lane + 32u * j;
        let row = r + i % 16u;
        if row < mp.rows {
            put(t + i / 16u, row, i32(tc[sg * 256u + i]), split);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn gemm_coop(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let r0 = wg.x * 128u;
    let t0 = wg.y * 64u;
    let sg = li / 32u;
    let lane = li % 32u;
    let fr = (sg % 4u) * 32u;
    let ft = (sg / 4u) * 32u;
    // Steps of 32 columns, split over z.
    let steps = mp.kvec * 2u;
    let per = (steps + nwg.z - 1u) / nwg.z;
    let m0 = min(steps, wg.z * per);
    let m1 = min(steps, m0 + per);
    // Loader roles: tile row li / 8 + 32 j, vec4 column li % 8 of each 32 columns. Rows past
    // the matrix are zero padding, tokens past the step finite leftovers: both only reach
    // outputs that are not stored.
    let kv4 = mp.kvec * 16u;
    let wsrc = (mp.row0 + r0 + li / 8u) * kv4 + li % 8u;
    let xsrc = (t0 + li / 8u) * kv4 + li % 8u;
    let at = (li / 8u) * CS + li % 8u;
    // The loads of the next two steps, in named registers (an indexed array would live in
    // memory); past the share they read its last step again.
    let last = max(m1, m0 + 1u) - 1u;
    var a0 = wh[wsrc + 8u * m0];
    var a1 = wh[wsrc + 32u * kv4 + 8u * m0];
    var a2 = wh[wsrc + 64u * kv4 + 8u * m0];
    var a3 = wh[wsrc + 96u * kv4 + 8u * m0];
    var b0 = xh[xsrc + 8u * m0];
    var b1 = xh[xsrc + 32u * kv4 + 8u * m0];
    let m0n = min(m0 + 1u, last);
    var p0 = wh[wsrc + 8u * m0n];
    var p1 = wh[wsrc + 32u * kv4 + 8u * m0n];
    var p2 = wh[wsrc + 64u * kv4 + 8u * m0n];
    var p3 = wh[wsrc + 96u * kv4 + 8u * m0n];
    var q0 = xh[xsrc + 8u * m0n];
    var q1 = xh[xsrc + 32u * kv4 + 8u * m0n];
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    for (var m = m0; m < m1; m = m + 1u) {
        ta[at] = a0;
        ta[at + 32u * CS] = a1;
        ta[at + 64u * CS] = a2;
        ta[at + 96u * CS] = a3;
        tb[at] = b0;
        tb[at + 32u * CS] = b1;
        workgroupBarrier();
        a0 = p0;
        a1 = p1;
        a2 = p2;
        a3 = p3;
        b0 = q0;
        b1 = q1;
        let mn = min(m + 2u, last);
        p0 = wh[wsrc + 8u * mn];
        p1 = wh[wsrc + 32u * kv4 + 8u * mn];
        p2 = wh[wsrc + 64u * kv4 + 8u * mn];
        p3 = wh[wsrc + 96u * kv4 + 8u * mn];
        q0 = xh[xsrc + 8u * mn];
        q1 = xh[xsrc + 32u * kv4 + 8u * mn];
        for (var k = 0u; k < 8u; k = k + 4u) {
            let fa0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[fr * CS + k], CS);
            let fa1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[(fr + 16u) * CS + k], CS);
            let fb0 = coopLoad<coop_mat16x16<f16, B>>(&tb[ft * CS + k], CS);
            let fb1 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 16u) * CS + k], CS);
            c00 = coopMultiplyAdd(fa0, fb0, c00);
            c01 = coopMultiplyAdd(fa0, fb1, c01);
            c10 = coopMultiplyAdd(fa1, fb0, c10);
            c11 = coopMultiplyAdd(fa1, fb1, c11);
        }
        workgroupBarrier();
    }
    let split = nwg.z > 1u;
    emit(c00, sg, lane, r0 + fr, t0 + ft, split);
    emit(c01, sg, lane, r0 + fr, t0 + ft + 16u, split);
    emit(c10, sg, lane, r0 + fr + 16u, t0 + ft, split);
    emit(c11, sg, lane, r0 + fr + 16u, t0 + ft + 16u, split);
}
