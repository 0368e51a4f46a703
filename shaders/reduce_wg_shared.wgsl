// Sum (max when `is_max`) over the FW invocations of the workgroup: a tree through
// workgroup memory. Must be called in uniform control flow.
var<workgroup> fred: array<f32, FW>;

fn wg_reduce(v: f32, li: u32, is_max: bool) -> f32 {
    fred[li] = v;
    workgroupBarrier();
    for (var s = FW / 2u; s > 0u; s = s >> 1u) {
        if li < s {
            let o = fred[li + s];
            fred[li] = select(fred[li] + o, max(fred[li], o), is_max);
        }
        workgroupBarrier();
    }
    let r = fred[0];
    workgroupBarrier();
    return r;
}
