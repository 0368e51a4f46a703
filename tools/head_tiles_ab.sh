#!/usr/bin/env bash
# Device: tiled head GEMM for batched rows (issue #15): tests, then A/B old (one-row kernel) vs new.
for f in .gl/*.deb; do dpkg -x $f / >/dev/null; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
for x in .gl/*.xz; do python3 -c "import lzma,sys; open(sys.argv[2],\"wb\").write(lzma.open(sys.argv[1]).read())" $x ${x%.xz}; chmod +x ${x%.xz}; done
B=.gl/bitnet
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== tests"
.gl/gpu_test --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED"
.gl/gpu_batch_test --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED"
$B synth --shape 2b4t --out /tmp/m >/dev/null
f() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("batch_decode_tok_s"))'; }
for r in 1 2; do
  for n in ${BATCHES:-8 16 32 64 256}; do
    line="round $r batch $n:"
    for v in 1000000:1000000 1:1000000 1:1; do
      x=$(BITNET_GPU_HEAD_TILES=$v $B bench --backend gpu --model /tmp/m --prompt-len 128 --gen 64 --batch $n --json | f)
      line="$line $v=$x"
    done
    echo "$line"
  done
done
echo "== profile batch 64 / 256, tiled (64)"
for n in 64 256; do
BITNET_GPU_HEAD_TILES=1:1 BITNET_GPU_PROFILE=1 $B bench --backend gpu --model /tmp/m --prompt-len 8 --gen 64 --batch $n --json 2>&1 | grep -E "head|argmax|total" | head
done
