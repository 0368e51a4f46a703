// Tensor-core probe (`bench --membw` with tensor cores on; `enable f16; enable
// wgpu_cooperative_matrix;` first): the 16x16x16 f16 x f16 + f32 products of matmul_coop.wgsl
// without its loaders. One 128-invocation workgroup (4 subgroups of 32) fills two 64 x 64 f16
// tiles in workgroup memory once, then runs ITERS rounds of 16 products a subgroup: with LOADS
// each round first loads its 2 A and 2 B fragments from the tiles as gemm_coop's inner loop
// does; without, the fragments are loaded once before the rounds. Each subgroup's 4
// accumulators are stored so nothing is optimised away.
// Dispatch: (workgroups, 1, 1); out holds 4096 f32 per workgroup.

override LOADS: bool = true;
override ITERS: u32 = 1024u;

@group(0) @binding(0) var<storage, read_write> out: array<f32>;

const CS: u32 = 18u;
var<workgroup> ta: array<vec4<f16>, 1152>;
var<workgroup> tb: array<vec4<f16>, 1152>;

@compute @workgroup_size(128)
fn coop_probe(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    for (var i = li; i < 1152u; i = i + 128u) {
        let v = f16(i32(i % 3u) - 1);
        ta[i] = vec4<f16>(v);
        tb[i] = vec4<f16>(f16(i % 7u));
    }
    workgroupBarrier();
    let sg = li / 32u;
    let fr = (sg % 2u) * 32u;
    let ft = (sg / 2u) * 32u;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[fr * CS], CS);
    var a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[(fr + 16u) * CS], CS);
    var b0 = coopLoad<coop_mat16x16<f16, B>>(&tb[ft * CS], CS);
    var b1 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 16u) * CS], CS);
    for (var r = 0u; r < ITERS; r = r + 1u) {
        for (var k = 0u; k < 16u; k = k + 4u) {
            if LOADS {
                a0 = coopLoadT<coop_mat16x16<f16, A>>(&ta[fr * CS + k], CS);
                a1 = coopLoadT<coop_mat16x16<f16, A>>(&ta[(fr + 16u) * CS + k], CS);
                b0 = coopLoad<coop_mat16x16<f16, B>>(&tb[ft * CS + k], CS);
                b1 = coopLoad<coop_mat16x16<f16, B>>(&tb[(ft + 16u) * CS + k], CS);
            }
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
    }
    let o = wg.x * 4096u + sg * 1024u;
    coopStore(c00, &out[o], 16u);
    coopStore(c01, &out[o + 256u], 16u);
    coopStore(c10, &out[o + 512u], 16u);
    coopStore(c11, &out[o + 768u], 16u);
}
