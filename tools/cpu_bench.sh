#!/usr/bin/env bash
# CPU benchmark of issue #2: a synthetic 2B4T checkpoint, 2 threads, each configuration run
# REPEAT times; prints the median of every bench field. Usage: tools/cpu_bench.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-/tmp/bitnet-2b4t}
REPEAT=${REPEAT:-3}
BIN=target/release/bitnet
cargo build --release --quiet
[ -f "$MODEL/model.safetensors" ] || $BIN synth --shape 2b4t --out "$MODEL"
$BIN bench --model tests/fixtures/tiny --threads 2 --prompt-len 1 --gen 2 --membw --json 2>/dev/null |
  python3 -c 'import json,sys; print("machine read bandwidth (2 threads): %.1f GB/s" % json.load(sys.stdin)["machine_gb_s"])'
run() { # label, bench args...
  local label=$1; shift
  for _ in $(seq "$REPEAT"); do $BIN bench --model "$MODEL" --threads 2 --json "$@" 2>/dev/null; done |
    python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
med = lambda k: statistics.median(r[k] for r in rows)
print("%-34s prefill %6.1f tok/s  decode %5.2f tok/s  %5.1f GB/s  %4.0f MB/token  RSS %5.0f MB  load %.1f s" % (
    sys.argv[1], med("prefill_tok_s"), med("decode_tok_s"), med("decode_gb_s"),
    med("decode_bytes_per_token") / 1e6, med("peak_rss_mb"), med("load_s")))' "$label"
}
for k in avx512vnni avx2; do
  if $BIN bench --model tests/fixtures/tiny --kernels $k --prompt-len 1 --gen 2 >/dev/null 2>&1; then
    run "$k pp128/tg128 bf16 head" --kernels $k --prompt-len 128 --gen 128
    run "$k pp128/tg128 int8 head" --kernels $k --prompt-len 128 --gen 128 --head int8
    run "$k pp512/tg32 bf16 head" --kernels $k --prompt-len 512 --gen 32
  fi
done
