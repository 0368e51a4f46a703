// The sums of a row pair's partials over its FTPR consecutive invocations, valid at the
// group's first invocation (li % FTPR == 0): through workgroup memory.
var<workgroup> pred: array<vec2<i32>, FW>;

fn row_pair_sums(p: vec2<i32>, li: u32) -> vec2<i32> {
    pred[li] = p;
    workgroupBarrier();
    var s = vec2<i32>(0, 0);
    if li % FTPR == 0u {
        for (var k = 0u; k < FTPR; k = k + 1u) {
            s = s + pred[li + k];
        }
    }
    return s;
}
