#!/usr/bin/env python3
"""Builds a tiny random checkpoint of 1bitLLM's BitNet b1.58 format (bitnet_b1_58-large / -3B:
`architectures: ["BitnetForCausalLM"]`, float16 master weights) and its float32 reference
outputs, in the layout of the other fixtures' reference.json.

The reference model is transformers' LlamaForCausalLM in float32 with the layer changes of
1bitLLM's modeling file applied as modules:
  * every projection is a BitLinear: per-tensor absmean ternarization of the master weight
    (s_w = 1 / max(mean|W|, 1e-5), W_q = clamp(round(W s_w), -1, 1) / s_w) and per-token
    absmax int8 activations (s_x = 127 / max(max|x|, 1e-5), x_q = clamp(round(x s_x)) / s_x);
  * an RMSNorm (`self_attn.inner_attn_ln`) on the attention output before o_proj and one
    (`mlp.ffn_layernorm`) on silu(gate) * up before down_proj, both with config eps;
  * the head is an ordinary float linear (untied), the MLP gates with SiLU.

The tokenizer files and the prompts' token ids come from an existing fixture with the same
tokenizer (`--tokenizer-from`), so the vocabulary is the fixture's.

Usage:
    python3 tools/make_fixture_1bitllm.py --out DIR [--seed 5] [--hidden 64]
        [--intermediate 176] [--layers 2] [--heads 4] [--kv-heads 4]
        [--tokenizer-from tests/fixtures/tiny-llama-bitnet] [--search 20]
Needs torch, transformers, safetensors, numpy.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

GREEDY_STEPS = 16
TIE_GAP = 0.004  # |W| / mean|W| kept this far from the rounding threshold 0.5
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class BitLinear(nn.Module):
    """1bitLLM's BitLinear forward (no bias), from a float master weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        w = self.weight
        s_w = 1.0 / w.abs().mean().clamp(min=1e-5)
        w_q = (w * s_w).round().clamp(-1, 1) / s_w
        s_x = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        x_q = (x * s_x).round().clamp(-128, 127) / s_x
        return F.linear(x_q, w_q)


def master_weight(rng, rows, cols, gain):
    """Gaussian float16 master weights whose |W| / mean|W| avoids the ternary threshold."""
    w = rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)
    for _ in range(8):
        w16 = w.astype(np.float16)
        mean = np.abs(w16.astype(np.float64)).mean()
        ratio = np.abs(w16.astype(np.float64)) / mean
        near = np.abs(ratio - 0.5) < TIE_GAP
        if not near.any():
            return w16
        w[near] = np.sign(w[near]) * mean * np.where(ratio[near] < 0.5, 0.5 - 2 * TIE_GAP,
                                                     0.5 + 2 * TIE_GAP)
    raise RuntimeError("could not keep the master weights off the ternary threshold")


def make_tensors(args, vocab, rng):
    h, i, hd = args.hidden, args.intermediate, args.hidden // args.heads
    q, kv = args.heads * hd, args.kv_heads * hd
    shapes = {"self_attn.q_proj": (q, h, 2.0), "self_attn.k_proj": (kv, h, 2.0),
              "self_attn.v_proj": (kv, h, 1.0), "self_attn.o_proj": (h, q, 1.0),
              "mlp.gate_proj": (i, h, 1.0), "mlp.up_proj": (i, h, 1.0),
              "mlp.down_proj": (h, i, 1.0)}
    norm = lambda n: rng.uniform(0.5, 1.5, n).astype(np.float16)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)).astype(np.float16),
         "model.norm.weight": norm(h),
         "lm_head.weight": (rng.standard_normal((vocab, h)) * 4.0 / np.sqrt(h)).astype(np.float16)}
    for l in range(args.layers):
        p = f"model.layers.{l}"
        t[f"{p}.input_layernorm.weight"] = norm(h)
        t[f"{p}.post_attention_layernorm.weight"] = norm(h)
        t[f"{p}.self_attn.inner_attn_ln.weight"] = norm(q)
        t[f"{p}.mlp.ffn_layernorm.weight"] = norm(i)
        for name in PROJECTIONS:
            rows, cols, gain = shapes[name]
            t[f"{p}.{name}.weight"] = master_weight(rng, rows, cols, gain)
    return t


def config_json(args, vocab, bos, eos):
    return {"architectures": ["BitnetForCausalLM"], "model_type": "llama",
            "vocab_size": vocab, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": args.eps,
            "rope_theta": args.rope_theta, "rope_scaling": None, "attention_bias": False,
            "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": bos,
            "eos_token_id": eos, "weight_bits": 1, "input_bits": 8, "use_cache": True}


def reference_model(cfg, tensors):
    """transformers' Llama in float32 with 1bitLLM's BitLinear projections and sub-norms."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "hidden_act",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
            "bos_token_id", "eos_token_id")
    lc = LlamaConfig(**{k: cfg[k] for k in keys}, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(lc).to(torch.float32).eval()
    f32 = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()}
    model.model.embed_tokens.weight.data.copy_(f32["model.embed_tokens.weight"])
    model.model.norm.weight.data.copy_(f32["model.norm.weight"])
    model.lm_head.weight.data.copy_(f32["lm_head.weight"])
    for l, layer in enumerate(model.model.layers):
        p = f"model.layers.{l}"
        layer.input_layernorm.weight.data.copy_(f32[f"{p}.input_layernorm.weight"])
        layer.post_attention_layernorm.weight.data.copy_(f32[f"{p}.post_attention_layernorm.weight"])
        for name in PROJECTIONS:
            parent, attr = name.split(".")
            setattr(getattr(layer, parent), attr, BitLinear(f32[f"{p}.{name}.weight"]))
        for parent, attr, norm in (("self_attn", "o_proj", "inner_attn_ln"),
                                   ("mlp", "down_proj", "ffn_layernorm")):
            w = f32[f"{p}.{parent}.{norm}.weight"]
            n = LlamaRMSNorm(w.numel(), eps=cfg["rms_norm_eps"])
            n.weight.data.copy_(w)
            setattr(getattr(layer, parent), attr, nn.Sequential(n, getattr(getattr(layer, parent), attr)))
    return model


@torch.no_grad()
def run_prompt(model, ids):
    seq = list(ids)
    out = model(torch.tensor([seq])).logits[0]
    entry = {"input_ids": list(ids), "prefill_last_logits": out[-1].tolist(),
             "greedy_tokens": [], "greedy_steps": []}
    logits = out[-1]
    for step in range(GREEDY_STEPS):
        top = torch.topk(logits, 5)
        tok = int(top.indices[0])
        entry["greedy_tokens"].append(tok)
        entry["greedy_steps"].append({"step": step, "token": tok,
                                      "top5_ids": top.indices.tolist(),
                                      "top5_logits": top.values.tolist(),
                                      "margin_top1_top2": float(top.values[0] - top.values[1])})
        seq.append(tok)
        logits = model(torch.tensor([seq])).logits[0, -1]
    return entry


def build(args, seed, src_ref, vocab, bos, eos):
    rng = np.random.default_rng(seed)
    tensors = make_tensors(args, vocab, rng)
    cfg = config_json(args, vocab, bos, eos)
    model = reference_model(cfg, tensors)
    prompts = []
    for p in src_ref["references"]["float32"]["prompts"]:
        e = run_prompt(model, p["input_ids"])
        prompts.append({"name": p["name"], **e})
    margin = min(s["margin_top1_top2"] for p in prompts for s in p["greedy_steps"])
    return cfg, tensors, prompts, margin


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=176)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--tokenizer-from", default="tests/fixtures/tiny-llama-bitnet")
    ap.add_argument("--search", type=int, default=0,
                    help="scan this many seeds from --seed and print each one's smallest greedy margin")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    src = Path(args.tokenizer_from)
    src_ref = json.loads((src / "reference.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    vocab, bos, eos = src_cfg["vocab_size"], src_cfg["bos_token_id"], src_cfg["eos_token_id"]
    if args.search:
        for seed in range(args.seed, args.seed + args.search):
            print(seed, build(args, seed, src_ref, vocab, bos, eos)[3], flush=True)
        return
    cfg, tensors, prompts, margin = build(args, args.seed, src_ref, vocab, bos, eos)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    ref = {"format_version": 1,
           "description": "float32 reference of a tiny random 1bitLLM-format (BitnetForCausalLM) "
                          "checkpoint, made by tools/make_fixture_1bitllm.py",
           "meta": {"family": "1bitllm", "seed": args.seed, "torch": torch.__version__,
                    "min_greedy_margin": margin, "args": vars(args)},
           "config": cfg,
           "references": {"float32": {"dtype": "float32", "prompts": prompts}}}
    (out / "reference.json").write_text(json.dumps(ref) + "\n")
    print(f"wrote {out}: smallest greedy margin {margin:.4f}")


if __name__ == "__main__":
    main()
