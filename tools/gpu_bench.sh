#!/usr/bin/env bash
# The GPU backend's device measurement (see BENCHMARKS.md). Run on the device machine from the
# repository root with `.gl/` carried: `.gl/*.deb` hold the Vulkan loader, `.gl/bitnet` the
# release CLI built on the workstation (`cargo build --release && strip -o .gl/bitnet
# target/release/bitnet`). Prints: adapter, the fixture's greedy tokens (must equal the CPU's),
# then RUNS (3) times the GPU issue's table (decode/prefill at 128-, 512- and 3,900-token
# prompts, batched decode at 64 and 256 rows) with medians and spread, decode/prefill at 512 with
# the int8 head and the f16 KV cache, and a decode profile with per-kernel
# GPU time (timestamp queries, `gpu:<kernel>` entries, ms per decode step), the device's copy
# bandwidth against the ternary GEMV's (`--membw`), and the prefill-512 kernel profile.
# `.gl/gpu_test` (optional: `cargo test --release --test gpu --no-run`, copied there; the tests
# find their fixtures through the checkout path they were built in) runs the GPU test suite on
# the device first.
set -u
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
B=${BITNET:-.gl/bitnet}
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null
if [ -x .gl/gpu_test ]; then
    echo "== GPU tests on the device"
    .gl/gpu_test --test-threads 1 2>&1 | grep -E "^test |test result|panicked"
fi
[ -d /tmp/m ] || $B synth --shape 2b4t --out /tmp/m >/dev/null
echo "== fixture greedy (want [80,109,170,175,74,53,218,111,202,76,77,152,162,62,111,234])"
$B generate --backend gpu --model tests/fixtures/tiny --tokens 297,251,21,88,201,206,250 \
    --max-tokens 16 --ignore-eos --json | grep -o '"tokens":\[[0-9,]*\]'
# The table, RUNS times: batch-1 decode and prefill at 128 / 512 / 3,900-token prompts,
# batched decode at 64 and 256 rows (prompt 128); medians and spread at the end.
TABLE="$OUT/gpu_table.jsonl"
: > "$TABLE"
fig() { python3 -c 'import json,sys; d=json.load(sys.stdin); p=d["prompt_len"]
for k,n in (("prefill_tok_s","prefill %d tok/s"),("decode_tok_s","batch-1 decode after %d tok/s")):
    print(json.dumps({"figure": n % p, "value": d[k]}))
if d.get("batch_decode_tok_s") is not None:
    print(json.dumps({"figure": "batch %d decode tok/s" % d["batch"], "value": d["batch_decode_tok_s"]}))'; }
for r in $(seq "${RUNS:-3}"); do
    for p in ${PROMPTS:-128 512 3900}; do
        $B bench --backend gpu --model /tmp/m --prompt-len "$p" --gen ${GEN:-64} --json | fig | tee -a "$TABLE"
    done
    for n in ${BATCHES:-64 256}; do
        $B bench --backend gpu --model /tmp/m --prompt-len 128 --gen ${GEN:-64} --batch "$n" --json |
            fig | grep '"batch ' | tee -a "$TABLE"
    done
done
echo "== medians over ${RUNS:-3} runs"
python3 tools/bench_summary.py "$TABLE"
for opt in "--head int8" "--kv f16"; do
    echo "== bench prompt 512, $opt"
    $B bench --backend gpu --model /tmp/m --prompt-len 512 --gen ${GEN:-64} --json $opt |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ("backend","prefill_tok_s","decode_tok_s","decode_gb_s")})'
done
echo "== bandwidth: copy kernel vs the ternary GEMV (all layers' matrices, one token)"
$B bench --backend gpu --model /tmp/m --prompt-len 16 --gen 8 --membw | grep -E "gpu copy|ternary gemv|machine read"
echo "== decode profile (prompt 128)"
$B bench --backend gpu --model /tmp/m --prompt-len 128 --gen ${GEN:-64} --profile
echo "== prefill profile (prompt 512, every kernel of the run timed; BITNET_GPU_PROFILE)"
BITNET_GPU_PROFILE=1 $B bench --backend gpu --model /tmp/m --prompt-len 512 --gen 2 --json 2>&1 | grep -v '^{'
