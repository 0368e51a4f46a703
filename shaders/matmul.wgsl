// The dp4a kernels (matmul_io.wgsl first).
// gemv (decode, T = 1 or a few): sum(code * x) - sum(x) per row; GROUPS groups of TPR invocations
// per 128-invocation workgroup, each group two rows (r and r + GROUPS); the per-invocation
// partial sums meet in workgroup memory. Dispatch: (ceil(rows / (2 * GROUPS)), T).
// gemv4 (small batches, T up to a few dozen): as gemv for 4 tokens at once, each weight vec4
// loaded and expanded to signed int8 once for the 4 (so no sum(x) correction); tokens past T
// read token 0 and are not stored.
// Dispatch: (ceil(rows / (2 * GROUPS)), ceil(T / 4)).
// gemm (prefill, batches): a 64-row x 64-token tile per 256-invocation workgroup, the weights
// expanded to signed int8 words in workgroup memory, 4 rows x 4 tokens per invocation; with
// several workgroups along z (split-K, for steps with too few tiles to fill the device), each
// sums its share of K into the i32 scratch `part` and gemm_finish applies the epilogue.
// Dispatch: (ceil(rows / 64), ceil(T / 64), splits).
// gemm_finish: the epilogue of a split-K gemm, one invocation per (row, token), leaving the
// scratch zero. Dispatch: (ceil(rows / 256), T).

override TPR: u32 = 8u;

@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

// sum over 16 columns of code * x for one weight word and one activation vec4.
fn dotw(wd: u32, xv: vec4<u32>) -> i32 {
    return dot4I8Packed(wd & M2, xv.x) + dot4I8Packed((wd >> 2u) & M2, xv.y)
        + dot4I8Packed((wd >> 4u) & M2, xv.z) + dot4I8Packed((wd >> 6u) & M2, xv.w);
}

fn xsum(xv: vec4<u32>) -> i32 {
    return dot4I8Packed(xv.x, ONES) + dot4I8Packed(xv.y, ONES) + dot4I8Packed(xv.z, ONES)
        + dot4I8Packed(xv.w, ONES);
}

// GV_WG (invocations per GEMV workgroup) is declared by src/gpu/ops/matmul.rs.
var<workgroup> gred: array<vec2<i32>, 128>;

@compute @workgroup_size(GV_WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let groups = GV_WG / TPR;
    let g = li / TPR;
    let lane = li % TPR;
    let t = wg.y;
    let ra = wg.x * 2u * groups + g;
    let rb = ra + groups;
    let kvec = mp.kvec;
    // Rows past the end read row 0 (always present) and are not stored.
    let wa = (mp.row0 + select(0u, ra, ra < mp.rows)) * kvec;
    let wb = (mp.row0 + select(0u, rb, rb < mp.rows)) * kvec;
    let xbase = t * kvec * 4u;
    var acc_a = 0;
    var acc_b = 0;
    var sx = 0;
    for (var m = lane; m < kvec; m = m + TPR) {
        let va = w[wa + m];
        let vb = w[wb + m];
        let xb = xbase + 4u * m;
        let x0 = xq[xb];
        let x1 = xq[xb + 1u];
        let x2 = xq[xb + 2u];
        let x3 = xq[xb + 3u];
        acc_a = acc_a + dotw(va.x, x0) + dotw(va.y, x1) + dotw(va.z, x2) + dotw(va.w, x3);
        acc_b = acc_b + dotw(vb.x, x0) + dotw(vb.y, x1) + dotw(vb.z, x2) + dotw(vb.w, x3);
        sx = sx + xsum(x0) + xsum(x1) + xsum(x2) + xsum(x3);
    }
    gred[li] = vec2<i32>(acc_a - sx, acc_b - sx);
    workgroupBarrier();
    // Invocation i < 2 * groups sums the TPR partials of row (i % groups) + groups * (i / groups).
    if li < 2u * groups {
        let gg = li % groups;
        let second = li >= groups;
        var s = 0;
        for (var k = 0u; k < TPR; k = k + 1u) {
            let p = gred[gg * TPR + k];
            s = s + select(p.x, p.y, second);
        }
        let row = select(ra - g + gg, rb - g + gg, second);
        if row < mp.rows {
            store(t, row, s);
        }
    }
}

var<workgroup> gred4: array<vec4<i32>, 256>;

// One weight vec4 (64 columns of 2-bit codes) as 16 words of signed int8 (-1, 0, 1).
struct Expanded {
    e0: vec4<u32>,
    e1: vec4<u32>,
    e2: vec4<u32>,
    e3: vec4<u32>,
}

fn expand(v: vec4<u32>) -> Expanded {
    return Expanded(expand_word(v.x), expand_word(v.y), expand_word(v.z), expand_word(v.w));
}

// Word wd (16 columns) -> 4 words of 4 signed int8 in dot4I8Packed order (see the top).
fn expand_word(wd: u32) -> vec4<u32> {
    return vec4<u32>(signed(wd & M2), signed((wd >> 2u) & M2), signed((wd >> 4u) & M2),
        signed((wd >> 6u) & M2));
}

// Rows a and b (expanded) against one token's 64 activations at xb.
fn dot_ab(a: Expanded, b: Expanded, xb: u32) -> vec2<i32> {
    let x0 = xq[xb];
    let x1 = xq[xb + 1u];
    let x2 = xq[xb + 2u];
    let x3 = xq[xb + 3u];
    return vec2<i32>(
        d4(a.e0, x0) + d4(a.e1, x1) + d4(a.e2, x2) + d4(a.e3, x3),
        d4(b.e0, x0) + d4(b.e1, x1) + d4(b.e2, x2) + d4(b.e3, x3)
    );
}

@compute @workgroup_size(GV_WG)
fn gemv4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let groups = GV_WG / TPR;
    let g = li / TPR;
    let lane = li % TPR;
    let t0 = wg.y * 4u;
    let ra = wg.x * 2u * groups + g;
    let rb = ra + groups;
    let kvec = mp.kvec;
    let wa = (mp.row0 + select(0u, ra, ra < mp.rows)) * kvec;
    let wb = (mp.row0 + select(0u, rb, rb < mp.rows)) * kvec;
    let xrow = kvec * 4u;
    let x0b = t0 * xrow;
    let x1b = select(0u, t0 + 1u, t0 + 1u < step.t) * xrow;
    let x2b = select(0u, t0 + 2u, t0 + 2u < step.t) * xrow;
    let x3b = select(0u, t0 + 3u, t0 + 3u < step.t) * xrow;
    // Component j: token t0 + j.
    var acc_a = vec4<i32>(0);
    var acc_b = vec4<i32>(0);
    // Each weight vec4 is expanded to signed int8 once for the 4 tokens.
    for (var m = lane; m < kvec; m = m + TPR) {
        let ea = expand(w[wa + m]);
        let eb = expand(w[wb + m]);
        let d0 = dot_ab(ea, eb, x0b + 4u * m);
        let d1 = dot_ab(ea, eb, x1b + 4u * m);
        let d2 = dot_ab(ea, eb, x2b + 4u * m);
        let d3 = dot_ab(ea, eb, x3b + 4u * m);
        acc_a = acc_a + vec4<i32>(d0.x, d1.x, d2.x, d3.x);
        acc_b = acc_b + vec4<i32>(d0.y, d1.y, d2.y, d3.y);
    }
    gred4[li] = acc_a;
    gred4[li + 128u] = acc_b;
    workgroupBarrier();
    // Invocation i < 2 * groups sums the TPR partials of row (i % groups) + groups * (i / groups).
    if li < 2u * groups {
        let gg = li % groups;
        let second = li >= groups;
        let base = gg * TPR + select(0u, 128u, second);
        var s = vec4<i32>(0);
        for (var k = 0u; k < TPR; k = k + 1u) {
            s = s + gred4[base + k];
        }
        let row = select(ra - g + gg, rb - g + gg, second);
        if row < mp.rows {
            store(t0, row, s.x);
            if t0 + 1u < step.t {
                store(t0 + 1u, row, s.y);
            }
            if t0 + 2u < step.t {
                store(t0 + 2u, row, s.z);
            }
            if t0 + 3u < step.t {
                store(t0 + 3u, row, s.w);
            }
        }
    }
}

// 64 rows x 16 expanded words (64 columns), row stride 20 words (padding against bank conflicts).
const WS: u32 = 20u;
var<workgroup> wt: array<vec4<u32>, 320>; // [row][5 vec4]
var<workgroup> xt: array<vec4<u32>, 320>; // [token][5 vec4]

// Codes 0,1,2 in the bytes of `s` -> signed int8 -1,0,1 (no borrow between bytes).
fn signed(s: u32) -> u32 {
    return ((s | 0x80808080u) - ONES) ^ 0x80808080u;
}

fn d4(a: vec4<u32>, b: vec4<u32>) -> i32 {
    return dot4I8Packed(a.x, b.x) + dot4I8Packed(a.y, b.y) + dot4I8Packed(a.z, b.z)
        + dot4I8Packed(a.w, b.w);
}

// One row's weights against the 4 tokens' activations.
fn d44(a: vec4<u32>, b0: vec4<u32>, b1: vec4<u32>, b2: vec4<u32>, b3: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(d4(a, b0), d4(a, b1), d4(a, b2), d4(a, b3));
}

@compute @workgroup_size(256)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
    @builtin(num_workgroups) nwg: vec3<u32>) {
    let r0 = wg.x * 64u;
    let t0 = wg.y * 64u;
    // This workgroup's share of K: steps m0..m1 (of 64 columns each).
    let per = (mp.kvec + nwg.z - 1u) / nwg.z;
    let m0 = min(wg.z * per, mp.kvec);
    let m1 = min(m0 + per, mp.kvec);
    let tx = li % 16u; // rows tx + 16 i
    let ty = li / 16u; // tokens ty + 16 j
    // acc_i: row tx + 16 i, component j: token ty + 16 j (no arrays: they can spill).
    var acc0 = vec4<i32>(0);
    var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0);
    var acc3 = vec4<i32>(0);
    let xrow = mp.kvec * 4u;
    // Loader roles: row / token li / 4, quarter li % 4.
    let lr = li / 4u;
    let lq = li % 4u;
    let wrow = r0 + lr;
    let wok = wrow < mp.rows;
    let wsrc = (mp.row0 + select(0u, wrow, wok)) * mp.kvec;
    let xtok = t0 + lr;
    let xok = xtok < step.t;
    let xsrc = select(0u, xtok, xok) * xrow;
    // The global loads of step m + 1 are issued before step m's arithmetic, so their latency
    // hides behind it.
    var cw = w[wsrc + min(m0, mp.kvec - 1u)][lq];
    var xv = vec4<u32>(0u);
    if xok {
        xv = xq[xsrc + 4u * min(m0, mp.kvec - 1u) + lq];
    }
    for (var m = m0; m < m1; m = m + 1u) {
        // One code word (16 columns) -> 4 words of signed int8.
        var e = vec4<u32>(0u);
        if wok {
            e = expand_word(cw);
        }
        wt[lr * 5u + lq] = e;
        xt[lr * 5u + lq] = xv;
        workgroupBarrier();
        if m + 1u < m1 {
            cw = w[wsrc + m + 1u][lq];
            if xok {
                xv = xq[xsrc + 4u * (m + 1u) + lq];
            }
        }
        for (var q = 0u; q < 4u; q = q + 1u) {
            let a0 = wt[tx * 5u + q];
            let a1 = wt[(tx + 16u) * 5u + q];
            let a2 = wt[(tx + 32u) * 5u + q];
            let a3 = wt[(tx + 48u) * 5u + q];
            let b0 = xt[ty * 5u + q];
            let b1 = xt[(ty + 16u) * 5u + q];
            let b2 = xt[(ty + 32u) * 5u + q];
            let b3 = xt[(ty + 48u) * 5u + q];
            acc0 = acc0 + d44(a0, b0, b1, b2, b3);
            acc1 = acc1 + d44(a1, b0, b1, b2, b3);
            acc2 = acc2 + d44(a2, b0, b1, b2, b3);
            acc3 = acc3 + d44(a3, b0, b1, b2, b3);
        }
        workgroupBarrier();
    }
    let split = nwg.z > 1u;
    store4(r0 + tx, t0 + ty, acc0, split);
    store4(r0 + tx + 16u, t0 + ty, acc1, split);
    store4(r0 + tx + 32u, t0 + ty, acc2, split);
    store4(r0 + tx + 48u, t0 + ty, acc3, split);
}

// Tokens t, t + 16, t + 32, t + 48 of `row`: stored, or (split) added into the scratch.
fn store4(row: u32, t: u32, a: vec4<i32>, split: bool) {
    if row >= mp.rows {
        return;
    }
    put(t, row, a.x, split);
    put(t + 16u, row, a.y, split);
    put(t + 32u, row, a.z, split);
    put(t + 48u, row, a.w, split);
}

@compute @workgroup_size(256)
fn gemm_finish(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    let t = gid.y;
    if row < mp.rows && t < step.t {
        store(t, row, atomicExchange(&part[t * mp.rows + row], 0));
    }
}
