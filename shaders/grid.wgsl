// The device-wide barrier probe (`bitnet bench --backend gpu --membw`): `gp.n` workgroups
// meet at `gp.rounds` barriers built from a storage atomic (arrival count) and device-scope
// storage barriers (release before arriving, acquire after leaving). Between barriers every
// invocation writes one word of its workgroup's row and, after the next barrier, checks the
// neighbouring workgroup's row: a word that is not the value written before the barrier
// counts as a stale read (what a persistent kernel would see if the barrier did not order
// memory). Rows alternate by round parity, so a fast workgroup never overwrites a row that a
// slow one has yet to check; with `gp.fresh` every round writes rows of its own instead (no
// address is read twice in the dispatch, so no cache can hold an old copy). A workgroup that
// spins `gp.spin` times without seeing every arrival counts a timeout and goes on: the
// workgroups were not all resident at once, and the host takes fewer.
// Dispatch: (gp.n, 1, 1); sync starts zeroed.

struct GridP {
    n: u32,
    rounds: u32,
    spin: u32,
    fresh: u32,
}

@group(0) @binding(0) var<uniform> gp: GridP;
// [0] arrivals, [1] timeouts, [2] stale reads.
@group(0) @binding(1) var<storage, read_write> sync: array<atomic<u32>, 4>;
@group(0) @binding(2) var<storage, read_write> rows: array<u32>;

fn grid_sync(li: u32, arrivals: u32) {
    storageBarrier();
    if li == 0u {
        atomicAdd(&sync[0], 1u);
        for (var s = 0u; s < gp.spin; s = s + 1u) {
            if atomicLoad(&sync[0]) >= arrivals {
                break;
            }
            if s + 1u == gp.spin {
                atomicAdd(&sync[1], 1u);
            }
        }
    }
    storageBarrier();
}

fn mark(round: u32, wg: u32, li: u32) -> u32 {
    return round * 0x9e3779b9u + wg * 256u + li;
}

@compute @workgroup_size(256)
fn grid_barrier(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let me = id.x;
    let other = (me + 1u) % gp.n;
    for (var r = 1u; r <= gp.rounds; r = r + 1u) {
        let half = select((r % 2u) * gp.n, (r - 1u) * gp.n, gp.fresh == 1u);
        rows[(half + me) * 256u + li] = mark(r, me, li);
        grid_sync(li, r * gp.n);
        if rows[(half + other) * 256u + li] != mark(r, other, li) {
            atomicAdd(&sync[2], 1u);
        }
    }
}
