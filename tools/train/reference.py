#!/usr/bin/env python3
"""transformers' view of an exported model: held-out perplexity and greedy continuations.

    python3 tools/train/reference.py --model DIR --file TEXT [--max-tokens N] [--out JSON]
                                     [--prompt TEXT ...] [--tokens N]

Loads DIR with transformers' BitNetForCausalLM (AutoModelForCausalLM.from_pretrained(dir), then
.to(torch.float32): docs/NUMERICS.md's float32 oracle), tokenizes TEXT with AutoTokenizer (BOS + text),
keeps the first --max-tokens ids (0 = all), and scores them in windows of max_position_embeddings tokens with stride = window (every token
but each window's first is predicted from the tokens before it in its window), the recipe of
tools/train/train.py and `bitnet perplexity`. Then greedy-decodes each prompt (BOS + prompt,
--tokens new tokens, not stopping at EOS) with the KV cache.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

# Prompts whose greedy paths have long stretches of decisive steps (top1 - top2 logit margin
# >= 0.25): where the margin is smaller, float32 rounding alone can change the token (see
# models/kjv-fortunes/README.md, "Numerical noise").
DEFAULT_PROMPTS = [
    "It is better to",
    "For God so loved the world,",
    "Now the serpent was",
    "Thou shalt not",
]


@torch.no_grad()
def window_nll(model, ids, window, stride=None):
    stride = stride or window
    n = len(ids)
    nll, count, prev_end, b = 0.0, 0, 0, 0
    while prev_end < n:
        e = min(b + window, n)
        w = torch.tensor([ids[b:e]])
        logits = model(input_ids=w, use_cache=False).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        first = max(b + 1, prev_end)
        pos = torch.arange(first, e)
        if len(pos):
            nll -= float(lp[pos - b - 1, w[0, pos - b]].sum())
            count += len(pos)
        prev_end = e
        b += stride
    return nll, count


@torch.no_grad()
def greedy(model, ids, n):
    """Greedy decoding with the KV cache; returns the tokens and each step's top1-top2 margin."""
    out, margins = [], []
    inp = torch.tensor([ids])
    past = None
    for _ in range(n):
        o = model(input_ids=inp, past_key_values=past, use_cache=True)
        past = o.past_key_values
        logits = o.logits[0, -1].float()
        top = torch.topk(logits, 2)
        t = int(top.indices[0])
        margins.append(float(top.values[0] - top.values[1]))
        out.append(t)
        inp = torch.tensor([[t]])
    return out, margins


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0 = all)")
    ap.add_argument("--out")
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).to(torch.float32).eval()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
    window = model.config.max_position_embeddings
    text = open(a.file, encoding="utf-8").read()
    ids = tok(text)["input_ids"]
    file_tokens = len(ids)
    if a.max_tokens:
        ids = ids[: a.max_tokens]
    nll, count = window_nll(model, ids, window)
    res = {
        "command": "python3 tools/train/reference.py " + " ".join(sys.argv[1:]),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": os.path.basename(os.path.normpath(a.model)),
        "file": os.path.basename(a.file),
        "file_chars": len(text),
        "max_tokens": a.max_tokens,
        "file_tokens": file_tokens,
        "tokens": len(ids),
        "window": window,
        "stride": window,
        "scored": count,
        "nll": nll,
        "mean_nll": nll / count,
        "ppl": math.exp(nll / count),
        "recipe": "ids = tokenizer(text)[:max_tokens] (BOS + text); windows [b, b+W), b = 0, W, 2W, ...; each window "
                  "run from position 0; positions b+1..e-1 scored; float32 model",
        "greedy": [],
    }
    for p in a.prompt or DEFAULT_PROMPTS:
        pids = tok(p)["input_ids"]
        toks, margins = greedy(model, pids, a.tokens)
        res["greedy"].append({"prompt": p, "input_ids": pids, "tokens": toks,
                              "text": tok.decode(toks, skip_special_tokens=False),
                              "min_margin_top1_top2": min(margins),
                              "margins_top1_top2": [round(x, 5) for x in margins]})
    res["seconds"] = round(time.time() - t0, 1)
    print(f"ppl {res['ppl']:.4f} over {count} scored tokens ({len(ids)} tokens)")
    for g in res["greedy"]:
        print(f"  {g['prompt']!r} -> {g['text']!r} (min margin {g['min_margin_top1_top2']:.3f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()
