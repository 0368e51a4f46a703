#!/usr/bin/env python3
"""Side-by-side CPU race of `bitnet bench` against llama.cpp-family `llama-bench` binaries
(llama.cpp, bitnet.cpp), in interleaved rounds on the machine at hand; prints a markdown table
of medians: prefill at each prompt length, decode, and each process's peak RSS.

Nothing of the peers is built here: build them by hand from their sources (BENCHMARKS.md says
how) and pass their `llama-bench` and GGUF files.

Usage:
  tools/race.py --model /tmp/bitnet-2b4t \\
      --peer "llama.cpp TQ2_0=/opt/llama.cpp/build/bin/llama-bench:/models/2b4t-tq2_0.gguf" \\
      --peer "bitnet.cpp I2_S=/opt/bitnet.cpp/build/bin/llama-bench:/models/2b4t-i2_s.gguf" \\
      [--ours "ours bf16 head=" --ours "ours int8 head=--head int8"] \\
      [--threads 2] [--rounds 3] [--prompts 128,512] [--gen 128] [--bitnet target/release/bitnet]
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys


def run(cmd):
    """Runs `cmd`; returns (stdout, peak RSS in MiB of that process)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {shlex.join(cmd)}")
    return out, usage.ru_maxrss / 1024


def ours(args, extra):
    """One round of `bitnet bench`: {figure: value}."""
    got, rss = {}, 0.0
    base = [args.bitnet, "bench", "--model", args.model, "--threads", str(args.threads), "--json"]
    for i, p in enumerate(args.prompts):
        gen = args.gen if i == 0 else 1
        out, r = run(base + ["--prompt-len", str(p), "--gen", str(gen)] + extra)
        d = json.loads(out.strip().splitlines()[-1])
        got[f"prefill {p} tok/s"] = d["prefill_tok_s"]
        if i == 0:
            got["decode tok/s"] = d["decode_tok_s"]
            got["decode GB/s"] = d["decode_gb_s"]
            got["load s"] = d["load_s"]
            # The yardstick: the read bandwidth right after the decode (`bench
            # --membw`: 1 GiB stream, best of 5), in a process of its own so that its buffer
            # stays out of the peak RSS.
            bw, _ = run(base + ["--prompt-len", "1", "--gen", "1", "--membw"] + extra)
            got["read bw GB/s"] = json.loads(bw.strip().splitlines()[-1])["machine_gb_s"]
            got["decode / read bw"] = got["decode GB/s"] / got["read bw GB/s"]
        rss = max(rss, r)
    got["peak RSS MiB"] = rss
    return got


def peer(args, bench, gguf):
    """One round of `llama-bench`: {figure: value}."""
    cmd = [bench, "-m", gguf, "-t", str(args.threads), "-r", "1", "-o", "json",
           "-p", ",".join(map(str, args.prompts)), "-n", str(args.gen)]
    out, rss = run(cmd)
    got = {}
    for row in json.loads(out):
        if row.get("n_gen", 0) == 0:
            got[f"prefill {row['n_prompt']} tok/s"] = row["avg_ts"]
        elif row.get("n_prompt", 0) == 0:
            got["decode tok/s"] = row["avg_ts"]
    got["peak RSS MiB"] = rss
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="our model directory (e.g. bitnet synth --shape 2b4t)")
    ap.add_argument("--bitnet", default="target/release/bitnet")
    ap.add_argument("--peer", action="append", default=[], help="NAME=LLAMA_BENCH:GGUF")
    ap.add_argument("--ours", action="append", default=[], help="NAME=EXTRA BENCH ARGS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="128,512")
    ap.add_argument("--gen", type=int, default=128)
    args = ap.parse_args()
    args.prompts = [int(p) for p in args.prompts.split(",")]
    contenders = []
    for spec in args.peer:
        name, _, paths = spec.partition("=")
        bench, _, gguf = paths.partition(":")
        if not (name and bench and gguf):
            sys.exit(f"--peer {spec!r}: want NAME=LLAMA_BENCH:GGUF")
        contenders.append((name, lambda b=bench, g=gguf: peer(args, b, g)))
    for spec in args.ours or ["ours bf16 head=", "ours int8 head=--head int8"]:
        name, _, extra = spec.partition("=")
        contenders.append((name, lambda e=shlex.split(extra): ours(args, e)))
    results = {name: {} for name, _ in contenders}
    for r in range(args.rounds):
        # Interleaved, each round starting one later, so drift spreads over everyone.
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for name, go in order:
            for k, v in go().items():
                results[name].setdefault(k, []).append(v)
            print(f"round {r + 1}: {name} done", file=sys.stderr)
    figures = [f"prefill {p} tok/s" for p in args.prompts] + [
        "decode tok/s", "peak RSS MiB", "decode GB/s", "read bw GB/s", "decode / read bw", "load s"]
    names = [n for n, _ in contenders]
    print(f"{args.threads} threads, {args.rounds} rounds, medians\n")
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for f in figures:
        cells = []
        for n in names:
            v = results[n].get(f)
            fmt = "{:,.2f}" if f in ("decode / read bw", "load s") else "{:,.1f}"
            cells.append(fmt.format(statistics.median(v)) if v else "-")
        print(f"| {f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
