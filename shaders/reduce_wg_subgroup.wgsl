// Sum (max when `is_max`) over the FW invocations of the workgroup: a subgroup reduction,
// then one partial per subgroup (SG consecutive invocations) through workgroup memory.
// Must be called in uniform control flow.
override SG: u32 = 32u;
var<workgroup> fred: array<f32, 64>; // FW / 4, the smallest subgroup

fn wg_reduce(v: f32, li: u32, is_max: bool) -> f32 {
    let s = select(subgroupAdd(v), subgroupMax(v), is_max);
    if li % SG == 0u {
        fred[li / SG] = s;
    }
    workgroupBarrier();
    var r = fred[0];
    for (var i = 1u; i < FW / SG; i = i + 1u) {
        let o = fred[i];
        r = select(r + o, max(r, o), is_max);
    }
    workgroupBarrier();
    return r;
}
