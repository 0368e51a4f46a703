// Decode GEMV (T = 1 or a few tokens) with its input's RMSNorm + int8 quantization fused in:
// every workgroup normalises and quantizes its token's source row into workgroup memory (as
// norm.wgsl; MODE 0: the row itself; MODE 1: relu(gate)² · up; width % 4 == 0), then
// computes 2 * FG output rows like matmul.wgsl's gemv (same weight and activation layout, exact
// i32 accumulation). This saves the norm's own dispatch; the redundant per-workgroup norm reads
// a row that is hot in L2.
// gemv_norm: rows r and r + FG per group. Dispatch: (ceil(rows / (2 * FG)), T).
// gemv_norm_rope (q|k|v): a group computes rows j and j + hd/2 of one head, so it can apply
// rotate-half RoPE to q and k (cos/sin table as rope.wgsl) and write k and v to the cache.
// Dispatch: (ceil(rows / (2 * FG)), T); rows is a multiple of hd.

struct FusedP {
    rows: u32,
    kvec: u32,       // vec4<u32> of weights per row
    ld: u32,         // f32 per output row
    width: u32,      // input elements normalised
    src_stride: u32, // f32 per source row
    eps: f32,
    q_dim: u32,
    kv_dim: u32,
    hd: u32,
    p0: u32,
    p1: u32,
    p2: u32,
}

override MODE: u32 = 0u;
override ACCUM: bool = false;

const FTPR: u32 = 16u;  // invocations per row pair
// Declared before this file by src/gpu/ops/gemv_fused.rs: invocations per workgroup `FW`,
// row pairs per workgroup `FG`, input words (4 columns) per invocation `NW` and vec4<u32> of
// quantized input `XMAX` (NW * FW / 4), the last two per input width
// (registers hold NW vec4s twice), up to 7 words = 7168 columns. `wg_reduce` (workgroup sum or
// max) and `row_pair_sums` are prepended too: reduce_wg_*.wgsl and reduce_pairs_*.wgsl.

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> fp: FusedP;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rs: array<f32>;
@group(0) @binding(4) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> gamma: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read_write> kc: array<KV_W>;
@group(0) @binding(9) var<storage, read_write> vc: array<KV_W>;

var<workgroup> xw: array<vec4<u32>, XMAX>;

const FM2: u32 = 0x03030303u;
const FONES: u32 = 0x01010101u;

fn fdotw(wd: u32, xv: vec4<u32>) -> i32 {
    return dot4I8Packed(wd & FM2, xv.x) + dot4I8Packed((wd >> 2u) & FM2, xv.y)
        + dot4I8Packed((wd >> 4u) & FM2, xv.z) + dot4I8Packed((wd >> 6u) & FM2, xv.w);
}

fn fxsum(xv: vec4<u32>) -> i32 {
    return dot4I8Packed(xv.x, FONES) + dot4I8Packed(xv.y, FONES) + dot4I8Packed(xv.z, FONES)
        + dot4I8Packed(xv.w, FONES);
}

// The source of token t's word w (columns 4w..4w+3), or 0 past the row.
fn sv4(t: u32, w: u32) -> vec4<f32> {
    if 4u * w >= fp.width {
        return vec4<f32>(0.0);
    }
    let base = t * (fp.src_stride / 4u);
    if MODE == 1u {
        let g = max(src[base + w], vec4<f32>(0.0));
        return g * g * src[base + fp.width / 4u + w];
    }
    return src[base + w];
}

fn gv4(w: u32) -> vec4<f32> {
    if 4u * w < fp.width {
        return gamma[w];
    }
    return vec4<f32>(0.0);
}

fn q8(y: f32, scale: f32) -> u32 {
    // WGSL round() is round-half-to-even, like the CPU quantizer.
    return bitcast<u32>(i32(clamp(round(y * scale), -128.0, 127.0))) & 0xffu;
}

// Normalises and quantizes token t's source row into `xw`; returns its scale (absmax / 127).
// Invocation li owns the words li + FW * k (4 columns each), held in registers: every load
// of the row is issued at once.
fn prologue(t: u32, li: u32) -> f32 {
    var v: array<vec4<f32>, NW>;
    var g: array<vec4<f32>, NW>;
    for (var k = 0u; k < NW; k = k + 1u) {
        v[k] = sv4(t, li + FW * k);
        g[k] = gv4(li + FW * k);
    }
    var ss = 0.0;
    for (var k = 0u; k < NW; k = k + 1u) {
        ss = ss + dot(v[k], v[k]);
    }
    let ms = wg_reduce(ss, li, false) / f32(fp.width);
    let inv = 1.0 / sqrt(ms + fp.eps);
    var am = 0.0;
    for (var k = 0u; k < NW; k = k + 1u) {
        let y = abs(g[k] * (v[k] * inv));
        am = max(am, max(max(y.x, y.y), max(y.z, y.w)));
    }
    let absmax = max(wg_reduce(am, li, true), 1e-5);
    let scale = div_exact(127.0, absmax);
    for (var k = 0u; k < NW; k = k + 1u) {
        let wi = li + FW * k;
        if wi < fp.kvec * 16u {
            let y = g[k] * (v[k] * inv);
            xw[wi >> 2u][wi & 3u] = q8(y.x, scale) | (q8(y.y, scale) << 8u)
                | (q8(y.z, scale) << 16u) | (q8(y.w, scale) << 24u);
        }
    }
    workgroupBarrier();
    return div_exact(absmax, 127.0);
}

// This invocation's share of sum(code * x) - sum(x) for rows ra and rb.
fn partial(ra: u32, rb: u32, lane: u32) -> vec2<i32> {
    let kvec = fp.kvec;
    // Rows past the end read row 0 (always present) and are not stored.
    let wa = select(0u, ra, ra < fp.rows) * kvec;
    let wb = select(0u, rb, rb < fp.rows) * kvec;
    var acc_a = 0;
    var acc_b = 0;
    var sx = 0;
    for (var m = lane; m < kvec; m = m + FTPR) {
        let va = w[wa + m];
        let vb = w[wb + m];
        let x0 = xw[4u * m];
        let x1 = xw[4u * m + 1u];
        let x2 = xw[4u * m + 2u];
        let x3 = xw[4u * m + 3u];
        acc_a = acc_a + fdotw(va.x, x0) + fdotw(va.y, x1) + fdotw(va.z, x2) + fdotw(va.w, x3);
        acc_b = acc_b + fdotw(vb.x, x0) + fdotw(vb.y, x1) + fdotw(vb.z, x2) + fdotw(vb.w, x3);
        sx = sx + fxsum(x0) + fxsum(x1) + fxsum(x2) + fxsum(x3);
    }
    return vec2<i32>(acc_a - sx, acc_b - sx);
}

@compute @workgroup_size(FW)
fn gemv_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    let xscale = prologue(t, li);
    let g = li / FTPR;
    let r0 = wg.x * 2u * FG;
    let s = row_pair_sums(partial(r0 + g, r0 + g + FG, li % FTPR), li);
    if li % FTPR == 0u {
        store_row(t, r0 + g, f32(s.x) * xscale);
        store_row(t, r0 + g + FG, f32(s.y) * xscale);
    }
}

fn store_row(t: u32, row: u32, v: f32) {
    if row < fp.rows {
        let o = t * fp.ld + row;
        if ACCUM {
            out[o] = out[o] + rounded(v * rs[row], fp.p0);
        } else {
            out[o] = v * rs[row];
        }
    }
}

// Row pair index pi -> its first row (j of head pi / (hd/2)); the second is + hd/2.
fn pair_row(pi: u32) -> u32 {
    let half = fp.hd / 2u;
    return (pi / half) * fp.hd + pi % half;
}

@compute @workgroup_size(FW)
fn gemv_norm_rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    let xscale = prologue(t, li);
    let half = fp.hd / 2u;
    let ra = pair_row(wg.x * FG + li / FTPR);
    let s = row_pair_sums(partial(ra, ra + half, li % FTPR), li);
    if li % FTPR == 0u {
        let a_row = ra;
        let b_row = a_row + half;
        if b_row < fp.rows {
            let a = f32(s.x) * xscale * rs[a_row];
            let b = f32(s.y) * xscale * rs[b_row];
            let j = a_row % fp.hd;
            let p = step.pos + t;
            let ob = t * fp.ld;
            if a_row < fp.q_dim + fp.kv_dim {
                let cs = table[p * half + j];
                let na = rounded(a * cs.x, fp.p0) - rounded(b * cs.y, fp.p0);
                let nb = rounded(b * cs.x, fp.p0) + rounded(a * cs.y, fp.p0);
                out[ob + a_row] = na;
                out[ob + b_row] = nb;
                if a_row >= fp.q_dim {
                    let cb = (((a_row - fp.q_dim) / fp.hd) * step.cap + p) * fp.hd + j;
                    k_put(cb, na);
                    k_put(cb + half, nb);
                }
            } else {
                out[ob + a_row] = a;
                out[ob + b_row] = b;
                let cb = (((a_row - fp.q_dim - fp.kv_dim) / fp.hd) * step.cap + p) * fp.hd + j;
                v_put(cb, a);
                v_put(cb + half, b);
            }
        }
    }
}
