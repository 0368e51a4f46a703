#!/usr/bin/env bash
# Serving throughput on the device machine (see BENCHMARKS.md): `bitnet bench-serve` against a
# server it starts on a `bitnet synth --shape 2b4t` model, on the GPU backend and on the CPU
# backend (all cores; bf16 and int8 head), RUNS times (1), with medians and spread at the end.
# Run from the repository root with `.gl/` carried as for tools/gpu_bench.sh.
set -u
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
B=${BITNET:-.gl/bitnet}
[ -d /tmp/m ] || $B synth --shape 2b4t --out /tmp/m >/dev/null
nproc
TABLE=${OUT:-/tmp}/serve_table.jsonl
: > "$TABLE"
for r in $(seq "${RUNS:-1}"); do
    for backend in ${BACKENDS:-gpu cpu}; do
        for head in ${HEADS:-native}; do
            echo "== bench-serve --backend $backend --head $head (run $r)"
            $B bench-serve --model /tmp/m --backend "$backend" --head "$head" --json \
                --clients ${CLIENTS:-1,8,32,64,128} --requests ${REQUESTS:-2} --prompt-len 32 \
                --max-tokens 64 | python3 -c '
import json, sys
for l in json.load(sys.stdin)["levels"]:
    print("clients %3d: %8.1f tok/s  TTFT p50 %7.1f ms p99 %7.1f ms  per-token p50 %6.1f ms" % (
        l["clients"], l["tokens_per_s"], l["ttft_ms_p50"], l["ttft_ms_p99"], l["tpot_ms_p50"]), file=sys.stderr)
    for k, n in (("tokens_per_s", "tok/s"), ("ttft_ms_p50", "TTFT p50 ms")):
        print(json.dumps({"figure": "%s %s, %d clients: %s" % (sys.argv[1], sys.argv[2], l["clients"], n), "value": l[k]}))
' "$backend" "$head" >> "$TABLE"
        done
    done
done
echo "== medians over ${RUNS:-1} runs"
python3 tools/bench_summary.py "$TABLE"
