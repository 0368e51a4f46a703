// Device-side acceptance of a queued decode step's drafts, and the position fix-up of the step
// queued behind it (src/gpu/ops/accept.rs). The step uniform is bound here as storage: `fixup`
// runs first in its step, after the host's write of the step's values and before any kernel
// reads them.
@group(0) @binding(0) var<storage, read_write> step: Step;
@group(0) @binding(1) var<storage, read_write> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> picks: array<u32>;
@group(0) @binding(3) var<storage, read_write> rejected: array<u32>;

// After a step of step.t rows (input, then drafts): its drafts are accepted while each equals
// the pick of the row before it; the next step's input is the pick after the accepted drafts,
// and `rejected` holds how many drafts were not accepted.
@compute @workgroup_size(1)
fn accept() {
    let t = step.t;
    var a = 0u;
    loop {
        if a + 1u >= t || tokens[a + 1u] != picks[a] {
            break;
        }
        a = a + 1u;
    }
    tokens[0] = picks[a];
    rejected[0] = t - 1u - a;
}

// First in a step whose input came from the device: the host recorded it at the position it
// would have if every draft of the step ahead were accepted; it moves back by the rejected ones,
// and the attention splits are recomputed for the true length exactly as the host computes them
// (src/gpu/cache.rs, `Single::splits`).
@compute @workgroup_size(1)
fn fixup() {
    let pos = step.pos - rejected[0];
    step.pos = pos;
    let maxlen = pos + step.t;
    let chunk = ((maxlen + step.most - 1u) / step.most + 63u) / 64u * 64u;
    step.chunk = chunk;
    step.nsplit = (maxlen + chunk - 1u) / chunk;
}
