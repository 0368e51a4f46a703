#!/usr/bin/env bash
# The npm package's WebGPU path on Dawn (Chrome's WebGPU implementation, the `webgpu` npm
# package) on the device: the Dawn test, then load seconds, prefill and decode tok/s for the
# default model and the 2B-4T shape. Run from the repository root with `.gl/` carried
# (`.gl/carry.tar.xz`: the stripped `bitnet` CLI, the `node` binary and `dawn.node` from
# npm/node_modules/webgpu/dist/linux-x64/; `.gl/webgpu/`: that package's index.js and
# package.json) and `npm/pkg` (npm run build) carried too.
set -u
for f in .gl/*.deb; do dpkg -x "$f" / 2>/dev/null; done
ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
tar xJf .gl/carry.tar.xz -C .gl
W=npm/node_modules/webgpu
mkdir -p "$W/dist/linux-x64"
cp .gl/webgpu/index.js .gl/webgpu/package.json "$W/"
cp .gl/dawn.node "$W/dist/linux-x64/"
NODE=.gl/node
B=.gl/bitnet
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
echo "== Dawn test"
(cd npm && ../$NODE --test test/dawn.test.mjs 2>&1 | grep -E "^# (pass|fail|skip)|^not ok|Δ|tokens")
[ -d /tmp/m ] || $B synth --shape 2b4t --out /tmp/m >/dev/null
echo "== native load of the 2B-4T shape (GPU)"
for r in 1 2; do BITNET_LOAD_TIMING=1 $B bench --backend gpu --model /tmp/m --prompt-len 8 --gen 8 --json | grep -o '"load_s":[0-9.]*'; done
for r in $(seq "${RUNS:-2}"); do
    echo "== Dawn, default model (run $r)"
    BITNET_BACKEND=webgpu BITNET_REPS=3 $NODE npm/test/bench.mjs models/kjv-fortunes 128 ${KJV_PROMPT:-200}
    echo "== Dawn, 2B-4T shape (run $r)"
    BITNET_LOAD_TIMING=1 BITNET_BACKEND=webgpu BITNET_REPS=3 $NODE npm/test/bench.mjs /tmp/m 128 512
    echo "== Dawn, 2B-4T shape without subgroups (run $r)"
    BITNET_SUBGROUPS=0 BITNET_BACKEND=webgpu BITNET_REPS=3 $NODE npm/test/bench.mjs /tmp/m 128 512
done
