#!/usr/bin/env python3
"""Speculative decoding's speed-up (issue #18): `bitnet generate --json` plain and with each
speculative method, interleaved rounds, the median decode tok/s and acceptance (of every
verified draft / of the drafts verified after a true input) printed as a Markdown table.

Usage: tools/spec_bench.py [--bitnet target/release/bitnet] [--backends gpu,cpu]
       [--runs 3] [--max-tokens 256] [--threads N]

Prompts: *repeat* (1,200 characters of the held-out text, then its first 200 again: the
quoting case prompt lookup is for) and three free generations ("Thou shalt not", "And God
said", "In the beginning"; the default model often falls into repeating itself, which prompt
lookup catches). Model: the default model,
drafts from `models/kjv-fortunes-draft`.
"""
import argparse
import json
import statistics
import subprocess

HELDOUT = "tests/fixtures/kjv-fortunes/heldout.txt"
MODEL = "models/kjv-fortunes"
DRAFT = "models/kjv-fortunes-draft"
METHODS = [
    ("plain", []),
    ("ngram k=4", ["--speculative", "ngram", "--draft-tokens", "4"]),
    ("ngram k=8", ["--speculative", "ngram", "--draft-tokens", "8"]),
    ("draft k=4", ["--speculative", f"draft:{DRAFT}", "--draft-tokens", "4"]),
]
# Beside a GPU target: the draft model on the host's cores.
CPU_DRAFT = ("draft k=4 on the CPU", METHODS[-1][1] + ["--draft-backend", "cpu"])


def methods(backend):
    return METHODS + [CPU_DRAFT] if backend == "gpu" else METHODS


def prompts():
    text = open(HELDOUT, encoding="utf-8").read()
    passage = text[:1200]
    return [
        ("repeat", passage + "\n" + passage[:200]),
        ("free", "Thou shalt not"),
        ("free 2", "And God said"),
        ("free 3", "In the beginning"),
    ]


def run(args, backend, prompt, extra):
    cmd = [args.bitnet, "generate", "--model", MODEL, "--backend", backend, "--prompt", prompt,
           "--max-tokens", str(args.max_tokens), "--ignore-eos", "--json"] + extra
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnet", default="target/release/bitnet")
    ap.add_argument("--backends", default="gpu,cpu")
    ap.add_argument("--prompts", default="", help="comma-separated prompt names (default all)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for backend in args.backends.split(","):
        for pname, prompt in prompts():
            if args.prompts and pname not in args.prompts.split(","):
                continue
            ms = methods(backend)
            got = {name: [] for name, _ in ms}
            tokens = {}
            for _ in range(args.runs):
                for name, extra in ms:
                    j = run(args, backend, prompt, extra)
                    got[name].append(j)
                    tokens.setdefault(name, j["tokens"])
            cells = []
            plain = statistics.median(j["decode_tok_s"] for j in got["plain"])
            for name, _ in ms:
                rate = statistics.median(j["decode_tok_s"] for j in got[name])
                cell = f"{rate:,.0f}"
                if name != "plain":
                    sp = [j["speculative"] for j in got[name]]
                    acc = statistics.median(x["acceptance_rate"] for x in sp)
                    right = statistics.median(x["draft_acceptance_rate"] for x in sp)
                    same = "" if tokens[name] == tokens["plain"] else ", tokens differ"
                    cell += f" ({rate / plain:.2f}×, acc. {acc:.2f} / {right:.2f}{same})"
                cells.append(cell)
            cells += [""] * (len(methods("gpu")) - len(cells))
            rows.append(f"| {backend} | {pname} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    print()
    names = [n for n, _ in methods("gpu")]
    print("| backend | prompt | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
