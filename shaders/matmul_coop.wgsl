// The tensor-core GEMM (matmul_io.wgsl first; `enable f16; enable wgpu_cooperative_matrix;`
// before everything): cooperative 16x16x16 f16 x f16 + f32 matrices, exact because ternary
// weights and int8 activations are exact in f16, their products in f32, and every partial sum
// is an integer below 2^24 (|sum| <= K * 128 with K <= 130,000).
//
// It reads the same packed operands as the int8 kernels (the 2-bit code words, the int8
// activation rows) and widens them in the loaders. The sum over K does not depend on the order
// of its columns, so the tiles hold each 16 columns in the order the code words keep them: tile
// vec4 b of a 16-column group holds columns b, 4 + b, 8 + b, 12 + b, which is byte b of the
// weights' code word (four 2-bit codes, widened through a 256-entry table in workgroup memory)
// and byte b of each of the activations' four words (widened by conversion).
//
// One 256-invocation workgroup (8 subgroups of 32) computes a 128-row x TN-token tile (TN = 64
// or 128, a constant the host puts before this file); subgroup s owns rows 32 (s % 4).. and
// tokens TN / 2 (s / 4).. as 2 x TN / 32 accumulator fragments. Per 64
// columns of K the invocations widen the tile's weight rows and activations into workgroup
// memory (the loads of the two following steps in flight meanwhile), then each subgroup
// multiplies 4 x (2 A + TN / 32 B fragments). With several workgroups along z (split-K, for steps
// with few tiles) each sums its share of K into the i32 scratch and gemm_finish (matmul.wgsl)
// applies the epilogue. The sums leave through a per-subgroup 16 x 16 staging fragment.
// Dispatch: (ceil(rows / 128), ceil(T / TN), splits).

@group(0) @binding(2) var<storage, read> w: array<u32>;

// vec4<f16> per tile row: 64 columns + 8 of padding against bank conflicts.
const CS: u32 = 18u;
var<workgroup> ta: array<vec4<f16>, 2304>; // 128 weight rows x CS, row-major
var<workgroup> tb: array<vec4<f16>, TN * CS>; // TN tokens x CS (columns of B)
var<workgroup> tc: array<f32, 2048>; // one 16 x 16 fragment per subgroup, column-major
var<workgroup> lut: array<vec4<f16>, 256>; // a code byte -> its four weights

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

// Byte b of each of the four activation words, as f16.
fn acts(x: vec4<u32>, b: u32) -> vec4<f16> {
    return vec4<f16>(extractBits(bitcast<vec4<i32>>(x), 8u * b, 8u));
}

// The code word `wd`'s 16 weights into the four tile vec4s from `at`.
fn put_weights(at: u32, wd: u32) {
    ta[at] = lut[wd & 0xffu];
    ta[at + 1u] = lut[(wd >> 8u) & 0xffu];
    ta[at + 2u] = lut[(wd >> 16u) & 0xffu];
    ta[at + 3u] = lut[wd >> 24u];
}

// Byte b of the four words of `x` as tile vec4 b of the 16-column group at `bt`.
fn put_acts(bt: u32, x: vec4<u32>) {
    tb[bt] = acts(x, 0u);
    tb[bt + 1u] = acts(x, 1u);
    tb[bt + 2u] = acts(x, 2u);
    tb[bt + 3u] = acts(x, 3u);
}

@compute @workgroup_size(256)
fn gemm_coop(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let wide = TN == 128u;
    let r0 = wg.x * 128u;
    let t0 = wg.y * TN;
    let sg = li / 32u;
    let lane = li % 32u;
    let fr = (sg % 4u) * 32u;
    let ft = (sg / 4u) * (TN / 2u);
    let codes = (vec4<u32>(li) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
    lut[li] = vec4<f16>(codes) - vec4<f16>(1.0h);
    // Steps of 64 columns (one weight vec4 a row), split over z.
    let steps = mp.kvec;
    let per = (steps + nwg.z - 1u) / nwg.z;
    let m0 = min(steps, wg.z * per);
    let m1 = min(steps, m0 + per);
    // Loader roles: weight row li / 2, code words 2 (li % 2), + 1 of each step's four; token
    // li / 4 (and li / 4 + 64 in a 128-token tile), the 16-column group li % 4 (one activation
    // vec4). Rows and tokens past the matrix and the step read the last one again: they only
    // reach outputs that are not stored.
    let wrow = min(r0 + li / 2u, mp.rows - 1u);
    let wsrc = (mp.row0 + wrow) * mp.kvec * 4u + 2u * (li % 2u);
    let at = (li / 2u) * CS + 8u * (li % 2u);
    let xsrc = min(t0 + li / 4u, step.t - 1u) * mp.kvec * 4u + li % 4u;
    let xsrc2 = min(t0 + 64u + li / 4u, step.t - 1u) * mp.kvec * 4u + li % 4u;
    let bt = (li / 4u) * CS + 4u * (li % 4u);
    // The loads of the next two steps, in named registers; past the share they read its last
    // step again.
    let last = max(m1, m0 + 1u) - 1u;
    var a0 = vec2<u32>(w[wsrc + 4u * m0], w[wsrc + 4u * m0 + 1u]);
    var b0 = xq[xsrc + 4u * m0];
    var e0 = vec4<u32>();
    let m0n = min(m0 + 1u, last);
    var a1 = vec2<u32>(w[wsrc + 4u * m0n], w[wsrc + 4u * m0n + 1u]);
    var b1 = xq[xsrc + 4u * m0n];
    var e1 = vec4<u32>();
    if wide {
        e0 = xq[xsrc2 + 4u * m0];
        e1 = xq[xsrc2 + 4u * m0n];
    }
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();
    workgroupBarrier();
    for (var m = m0; m < m1; m = m + 1u) {
        put_weights(at, a0.x);
        put_weights(at + 4u, a0.y);
        put_acts(bt, b0);
        if wide {
            put_acts(bt + 64u * CS, e0);
        }
        workgroupBarrier();
        a0 = a1;
        b0 = b1;
        e0 = e1;
        let mn = min(m + 2u, last);
        a1 = vec2<u32>(w[wsrc + 4u * mn], w[wsrc + 4u * mn + 1u]);
        b1 = xq[xsrc + 4u * mn];
        if wide {
            e1 = xq[xsrc2 + 4u * mn];
        }
        for (var k = 0u; k < 16u; k = k + 4u) {
            let fa0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[fr * CS + k], CS);
            let fa1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[(fr + 16u) * CS + k], CS);
            let fb0 = coopLoad<coop_mat16x16<f16, B>>(&tb[ft * CS + k], CS);
            let fb1 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 16u) * CS + k], CS);
            c00 = coopMultiplyAdd(fa0, fb0, c00);
            c01 = coopMultiplyAdd(fa0, fb1, c01);
            c10 = coopMultiplyAdd(fa1, fb0, c10);
            c11 = coopMultiplyAdd(fa1, fb1, c11);
            if wide {
                let fb2 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 32u) * CS + k], CS);
                let fb3 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 48u) * CS + k], CS);
                c02 = coopMultiplyAdd(fa0, fb2, c02);
                c03 = coopMultiplyAdd(fa0, fb3, c03);
                c12 = coopMultiplyAdd(fa1, fb2, c12);
                c13 = coopMultiplyAdd(fa1, fb3, c13);
            }
        }
        workgroupBarrier();
    }
    let split = nwg.z > 1u;
    emit(c00, sg, lane, r0 + fr, t0 + ft, split);
    emit(c01, sg, lane, r0 + fr, t0 + ft + 16u, split);
    emit(c10, sg, lane, r0 + fr + 16u, t0 + ft, split);
    emit(c11, sg, lane, r0 + fr + 16u, t0 + ft + 16u, split);
    if wide {
        emit(c02, sg, lane, r0 + fr, t0 + ft + 32u, split);
        emit(c03, sg, lane, r0 + fr, t0 + ft + 48u, split);
        emit(c12, sg, lane, r0 + fr + 16u, t0 + ft + 32u, split);
        emit(c13, sg, lane, r0 + fr + 16u, t0 + ft + 48u, split);
    }
}
