// The output head for many step rows on cooperative 16x16x16 f16 x f16 + f32 matrices
// (`enable f16; enable wgpu_cooperative_matrix;` and head_shard.wgsl first). bf16 weights are
// exact in f16 once scaled by the shard's power of two `wscale` (which puts the shard's largest
// weight below 2^15; weights 30 binades below that keep their value to 2^-25 of the scaled
// largest). Each f32 input x is split into hi = f16(x) and lo = f16(x - hi), 22 of its 24
// significant bits (or to 2^-25 absolutely, for inputs near f16's subnormals); the host uses
// this kernel only where every input is below 2^15 in magnitude. Products of f16 are exact in
// f32 and summed in f32, so a logit differs from `gemm`'s (head.wgsl) by a few f32 roundings of
// its terms, like any other summation order.
//
// One 256-invocation workgroup (8 subgroups of 32) computes a 128 vocabulary-row x 64 step-row
// tile; subgroup s owns rows 32 (s % 4).. and step rows 32 (s / 4).. as 2 x 2 accumulator
// fragments, each fed by the weights against hi and against lo. Per 64 columns the
// invocations widen the tile's weights and split its inputs into workgroup memory (the next
// step's loads in flight meanwhile), then each subgroup multiplies 4 x (2 A + 4 B fragments).
// Dispatch: (ceil(shard rows / 128), ceil(nrows / 64)).

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> shard: Shard;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> hn: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;

// vec4<f16> per tile row: 64 columns + 8 of padding against bank conflicts.
const CS: u32 = 18u;
var<workgroup> ta: array<vec4<f16>, 2304>; // 128 vocabulary rows x CS, row-major
var<workgroup> th: array<vec4<f16>, 1152>; // 64 step rows x CS: hi
var<workgroup> tl: array<vec4<f16>, 1152>; // 64 step rows x CS: lo
var<workgroup> tc: array<f32, 2048>; // one 16 x 16 fragment per subgroup, column-major

fn bf16_lo(v: u32) -> f32 {
    return bitcast<f32>(v << 16u);
}

fn bf16_hi(v: u32) -> f32 {
    return bitcast<f32>(v & 0xffff0000u);
}

// Eight bf16 weights (four pairs) scaled into f16, as two vec4.
fn widen(v: vec4<u32>, s: f32) -> array<vec4<f16>, 2> {
    let a = vec4<f32>(bf16_lo(v.x), bf16_hi(v.x), bf16_lo(v.y), bf16_hi(v.y)) * s;
    let b = vec4<f32>(bf16_lo(v.z), bf16_hi(v.z), bf16_lo(v.w), bf16_hi(v.w)) * s;
    return array<vec4<f16>, 2>(vec4<f16>(a), vec4<f16>(b));
}

// A step's global loads: one invocation's 32 weight columns of a vocabulary row (4 vec4 of
// bf16 pairs) and 16 input columns of a step row (4 vec4).
struct Loads {
    w0: vec4<u32>,
    w1: vec4<u32>,
    w2: vec4<u32>,
    w3: vec4<u32>,
    x0: vec4<f32>,
    x1: vec4<f32>,
    x2: vec4<f32>,
    x3: vec4<f32>,
}

// Weight vec4 `m` (8 columns) of the row at `wsrc`, zero past the row.
fn wload(wsrc: u32, m: u32) -> vec4<u32> {
    if 2u * m >= shard.hn_vec4 {
        return vec4<u32>(0u);
    }
    return w[wsrc + m];
}

// Input vec4 `m` (4 columns) of the step row at `xsrc`, zero past the row.
fn xload(xsrc: u32, m: u32) -> vec4<f32> {
    if m >= shard.hn_vec4 {
        return vec4<f32>(0.0);
    }
    return hn[xsrc + m];
}

// Step `k` (columns 64k..64k + 64): weight vec4 8k + wq.. and input vec4 16k + xq.. .
fn load(k: u32, wsrc: u32, wq: u32, xsrc: u32, xq: u32) -> Loads {
    let wm = 8u * k + wq;
    let xm = 16u * k + xq;
    return Loads(
        wload(wsrc, wm),
        wload(wsrc, wm + 1u),
        wload(wsrc, wm + 2u),
        wload(wsrc, wm + 3u),
        xload(xsrc, xm),
        xload(xsrc, xm + 1u),
        xload(xsrc, xm + 2u),
        xload(xsrc, xm + 3u),
    );
}

// Input vec4 `x` split into hi and lo at tile vec4 `at`.
fn put_input(at: u32, x: vec4<f32>) {
    let hi = vec4<f16>(x);
    th[at] = hi;
    tl[at] = vec4<f16>(x - vec4<f32>(hi));
}

// Fragment `c` (vocabulary rows r.., step rows t..) through the staging area into the logits,
// unscaled.
fn emit(c: coop_mat16x16<f32, C>, sg: u32, lane: u32, r: u32, t: u32, unscale: f32) {
    coopStore(c, &tc[sg * 256u], 16u);
    workgroupBarrier();
    for (var j = 0u; j < 8u; j = j + 1u) {
        let i = lane + 32u * j;
        let row = r + i % 16u;
        let tr = t + i / 16u;
        if row < shard.rows && tr < step.nrows {
            logits[tr * shard.vocab + shard.row0 + row] = tc[sg * 256u + i] * unscale;
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn head_coop(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r0 = wg.x * 128u;
    let t0 = wg.y * 64u;
    let sg = li / 32u;
    let lane = li % 32u;
    let fr = (sg % 4u) * 32u;
    let ft = (sg / 4u) * 32u;
    let s = shard.scale;
    // Loader roles: vocabulary row li / 2, weight vec4 4 (li % 2).. of each step; step row
    // li / 4, input vec4 4 (li % 4).. . Rows past the shard and the step read its last one:
    // they only reach outputs that are not stored.
    let nv = shard.row_words / 4u;
    let wsrc = min(r0 + li / 2u, shard.rows - 1u) * nv;
    let wq = 4u * (li % 2u);
    let at = (li / 2u) * CS + 2u * wq;
    let xsrc = (step.row0 + min(t0 + li / 4u, step.nrows - 1u)) * shard.hn_vec4;
    let xq = 4u * (li % 4u);
    let bt = (li / 4u) * CS + xq;
    let steps = (shard.hn_vec4 + 15u) / 16u;
    var l = load(0u, wsrc, wq, xsrc, xq);
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    for (var k = 0u; k < steps; k = k + 1u) {
        let a0 = widen(l.w0, s);
        let a1 = widen(l.w1, s);
        let a2 = widen(l.w2, s);
        let a3 = widen(l.w3, s);
        ta[at] = a0[0];
        ta[at + 1u] = a0[1];
        ta[at + 2u] = a1[0];
        ta[at + 3u] = a1[1];
        ta[at + 4u] = a2[0];
        ta[at + 5u] = a2[1];
        ta[at + 6u] = a3[0];
        ta[at + 7u] = a3[1];
        put_input(bt, l.x0);
        put_input(bt + 1u, l.x1);
        put_input(bt + 2u, l.x2);
        put_input(bt + 3u, l.x3);
        workgroupBarrier();
        l = load(k + 1u, wsrc, wq, xsrc, xq);
        for (var q = 0u; q < 16u; q = q + 4u) {
            let fa0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[fr * CS + q], CS);
            let fa1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[(fr + 16u) * CS + q], CS);
            let fh0 = coopLoad<coop_mat16x16<f16, B>>(&th[ft * CS + q], CS);
            let fh1 = coopLoad<coop_mat16x16<f16, B>>(&th[(ft + 16u) * CS + q], CS);
            let fl0 = coopLoad<coop_mat16x16<f16, B>>(&tl[ft * CS + q], CS);
            let fl1 = coopLoad<coop_mat16x16<f16, B>>(&tl[(ft + 16u) * CS + q], CS);
            c00 = coopMultiplyAdd(fa0, fl0, c00);
            c01 = coopMultiplyAdd(fa0, fl1, c01);
            c10 = coopMultiplyAdd(fa1, fl0, c10);
            c11 = coopMultiplyAdd(fa1, fl1, c11);
            c00 = coopMultiplyAdd(fa0, fh0, c00);
            c01 = coopMultiplyAdd(fa0, fh1, c01);
            c10 = coopMultiplyAdd(fa1, fh0, c10);
            c11 = coopMultiplyAdd(fa1, fh1, c11);
        }
        workgroupBarrier();
    }
    let unscale = shard.unscale;
    emit(c00, sg, lane, r0 + fr, t0 + ft, unscale);
    emit(c01, sg, lane, r0 + fr, t0 + ft + 16u, unscale);
    emit(c10, sg, lane, r0 + fr + 16u, t0 + ft, unscale);
    emit(c11, sg, lane, r0 + fr + 16u, t0 + ft + 16u, unscale);
}
