// The tensor-core GEMM (matmul_io.wgsl first; `enable f16; enable wgpu_cooperative_matrix;`
// before everything): cooperative 16x16x16 f16 x f16 + f32 matrices, exact because ternary
// weights and int8 activations are exact in f16, their products in f32, and every partial sum
// is an integer below 2^24 (|sum| <= K * 127 with K <= 130,000).
//
// One 128-invocation workgroup (4 subgroups of 32) computes a 64-row x 64-token tile; subgroup
// s owns rows 32 (s % 2).. and tokens 32 (s / 2).. as 2 x 2 accumulator fragments. Per 64
// columns of K the invocations expand the tile's weight codes and activations to f16 in
// workgroup memory (the next step's global loads issued before this step's products), then each
// subgroup multiplies 4 x (2 A + 2 B fragments). The integer sums leave through a per-subgroup
// 16 x 16 staging fragment into the shared epilogue `store`.
// Dispatch: (ceil(rows / 64), ceil(T / 64)).

// vec4<f16> per tile row: 64 columns + 8 of padding against bank conflicts.
const CS: u32 = 18u;
var<workgroup> ta: array<vec4<f16>, 1152>; // 64 weight rows x CS, row-major
var<workgroup> tb: array<vec4<f16>, 1152>; // 64 tokens x CS (columns of B)
var<workgroup> tc: array<f32, 1024>; // one 16 x 16 fragment per subgroup, column-major

// Codes 0..2 in the 4 bytes of `c` -> weights -1, 0, 1.
fn codes_f16(c: u32) -> vec4<f16> {
    let v = vec4<u32>(c & 0xffu, (c >> 8u) & 0xffu, (c >> 16u) & 0xffu, c >> 24u);
    return vec4<f16>(v) - vec4<f16>(1.0h);
}

// Expands one code word (16 columns, see matmul_io.wgsl) into 4 tile vec4s at `at`.
fn put_codes(at: u32, wd: u32, ok: bool) {
    for (var s = 0u; s < 4u; s = s + 1u) {
        var v = vec4<f16>(0.0h);
        if ok {
            v = codes_f16((wd >> (2u * s)) & M2);
        }
        ta[at + s] = v;
    }
}

// One activation vec4 (16 int8 columns) into 4 tile vec4s at `at`.
fn put_acts(at: u32, xv: vec4<u32>) {
    tb[at] = vec4<f16>(unpack4xI8(xv.x));
    tb[at + 1u] = vec4<f16>(unpack4xI8(xv.y));
    tb[at + 2u] = vec4<f16>(unpack4xI8(xv.z));
    tb[at + 3u] = vec4<f16>(unpack4xI8(xv.w));
}

// Fragment `c` of subgroup `sg` (rows r, tokens t of the output) through the staging area.
fn emit(c: coop_mat16x16<f32, C>, sg: u32, lane: u32, r: u32, t: u32) {
    coopStore(c, &tc[sg * 256u], 16u);
    workgroupBarrier();
    for (var j = 0u; j < 8u; j = j + 1u) {
        let i = lane + 32u * j;
        let row = r + i % 16u;
        let tok = t + i / 16u;
        if row < mp.rows && tok < step.t {
            store(tok, row, i32(tc[sg * 256u + i]));
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128)
fn gemm_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r0 = wg.x * 64u;
    let t0 = wg.y * 64u;
    let sg = li / 32u;
    let lane = li % 32u;
    let fr = (sg % 2u) * 32u;
    let ft = (sg / 2u) * 32u;
    // Loader roles: weight row / token li / 2, columns 32 (li % 2).. of each 64.
    let lr = li / 2u;
    let lh = li % 2u;
    let wrow = r0 + lr;
    let wok = wrow < mp.rows;
    let wsrc = (mp.row0 + select(0u, wrow, wok)) * mp.kvec;
    let xtok = t0 + lr;
    let xok = xtok < step.t;
    let xsrc = select(0u, xtok, xok) * mp.kvec * 4u + 2u * lh;
    let at = lr * CS + 8u * lh;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var cw = w[wsrc];
    var x0 = vec4<u32>(0u);
    var x1 = vec4<u32>(0u);
    if xok {
        x0 = xq[xsrc];
        x1 = xq[xsrc + 1u];
    }
    for (var m = 0u; m < mp.kvec; m = m + 1u) {
        put_codes(at, select(cw.x, cw.z, lh == 1u), wok);
        put_codes(at + 4u, select(cw.y, cw.w, lh == 1u), wok);
        put_acts(at, x0);
        put_acts(at + 4u, x1);
        workgroupBarrier();
        if m + 1u < mp.kvec {
            cw = w[wsrc + m + 1u];
            if xok {
                x0 = xq[xsrc + 4u * (m + 1u)];
                x1 = xq[xsrc + 4u * (m + 1u) + 1u];
            }
        }
        for (var k = 0u; k < 16u; k = k + 4u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[fr * CS + k], CS);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[(fr + 16u) * CS + k], CS);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&tb[ft * CS + k], CS);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 16u) * CS + k], CS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        workgroupBarrier();
    }
    emit(c00, sg, lane, r0 + fr, t0 + ft);
    emit(c01, sg, lane, r0 + fr, t0 + ft + 16u);
    emit(c10, sg, lane, r0 + fr + 16u, t0 + ft);
    emit(c11, sg, lane, r0 + fr + 16u, t0 + ft + 16u);
}
