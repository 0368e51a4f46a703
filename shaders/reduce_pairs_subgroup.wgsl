// The sums of a row pair's partials over its FTPR (16) consecutive invocations, valid at the
// group's first invocation: a butterfly of subgroup shuffles (subgroups of 16 or more).
fn row_pair_sums(p: vec2<i32>, li: u32) -> vec2<i32> {
    var s = p;
    s = s + subgroupShuffleXor(s, 8u);
    s = s + subgroupShuffleXor(s, 4u);
    s = s + subgroupShuffleXor(s, 2u);
    s = s + subgroupShuffleXor(s, 1u);
    return s;
}
