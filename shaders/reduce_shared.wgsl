// Row reductions over TPR consecutive invocations through workgroup memory.
// Must be called in uniform control flow by the whole (256-invocation) workgroup.
var<workgroup> red_i: array<i32, 256>;
var<workgroup> red_f: array<f32, 256>;

fn reduce_i32(v: i32, li: u32) -> i32 {
    red_i[li] = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
        if (li % TPR) < s {
            red_i[li] = red_i[li] + red_i[li + s];
        }
        workgroupBarrier();
    }
    let r = red_i[li - li % TPR];
    workgroupBarrier();
    return r;
}

fn reduce_f32(v: f32, li: u32) -> f32 {
    red_f[li] = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
        if (li % TPR) < s {
            red_f[li] = red_f[li] + red_f[li + s];
        }
        workgroupBarrier();
    }
    let r = red_f[li - li % TPR];
    workgroupBarrier();
    return r;
}
