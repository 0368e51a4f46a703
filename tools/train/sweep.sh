#!/bin/bash
# The device run that trained models/kjv-fortunes: four seeded QAT runs side by side on one GPU,
# then the one with the lowest validation loss is exported to OUT (its checkpoint) with every
# run's log. Run from a folder holding train.py and data/ (train.u16, val.u16, test.u16):
#     STEPS=1400 TIME_LIMIT=400 bash sweep.sh data OUT
set -u
DATA=$1
OUT=$2
STEPS=${STEPS:-1400}
TL=${TIME_LIMIT:-400}
W=/tmp/sweep
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1
run() {
    name=$1
    shift
    python3 train.py --data "$DATA" --out "$W/$name" --steps "$STEPS" --compile --eval-every 100 \
        --time-limit "$TL" "$@" >"$W/$name.log" 2>&1
}
run base-d0.1 --preset base --dropout 0.1 --seed 1 &
run wide-d0.1 --preset wide --dropout 0.1 --seed 1 &
run wide-d0.2 --preset wide --dropout 0.2 --seed 1 &
run wide-d0.1-short --preset wide --dropout 0.1 --seed 1 --steps $((STEPS / 2)) &
wait
python3 - "$W" "$OUT" <<'PY'
import json, os, shutil, sys
w, out = sys.argv[1:]
runs = {}
for name in sorted(os.listdir(w)):
    p = os.path.join(w, name, "log.json")
    if os.path.isdir(os.path.join(w, name)) and os.path.exists(p):
        runs[name] = json.load(open(p))
        shutil.copy(p, os.path.join(out, f"log-{name}.json"))
best = min(runs, key=lambda n: runs[n]["best_val_loss"])
for f in ("config.json", "generation_config.json", "model.safetensors"):
    shutil.copy(os.path.join(w, best, f), os.path.join(out, f))
summary = {n: {k: r.get(k) for k in ("params", "steps", "epochs", "train_seconds", "best_val_loss", "best_step",
                                     "final_train_loss", "packed_bytes", "stopped_early_at_step")}
           | {"test_ppl": r["test"]["ppl"]} for n, r in runs.items()}
summary = {"chosen": best, "runs": summary}
json.dump(summary, open(os.path.join(out, "sweep.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
tail -n 4 "$W"/*.log
