// Row reductions over TPR consecutive invocations = one subgroup (TPR == subgroup size).
fn reduce_i32(v: i32, li: u32) -> i32 {
    return subgroupAdd(v);
}

fn reduce_f32(v: f32, li: u32) -> f32 {
    return subgroupAdd(v);
}
