#!/usr/bin/env bash
# Serving throughput on the device machine (see BENCHMARKS.md): `bitnet bench-serve` against a
# server it starts on a `bitnet synth --shape 2b4t` model, on the GPU backend and on the CPU
# backend (all cores; bf16 and int8 head). Run from the repository root with `.gl/` carried as
# for tools/gpu_bench.sh.
set -u
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
B=${BITNET:-.gl/bitnet}
[ -d /tmp/m ] || $B synth --shape 2b4t --out /tmp/m >/dev/null
nproc
for backend in ${BACKENDS:-gpu cpu}; do
    for head in ${HEADS:-native}; do
        echo "== bench-serve --backend $backend --head $head"
        $B bench-serve --model /tmp/m --backend "$backend" --head "$head" \
            --clients ${CLIENTS:-1,8,32,64} --requests ${REQUESTS:-2} --prompt-len 32 --max-tokens 64
    done
done
