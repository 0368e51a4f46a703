#!/usr/bin/env python3
"""Quantization-aware training of a small BitNet b1.58 model (the 2B4T architecture of docs/NUMERICS.md)
and export in the release's packed checkpoint format.

    python3 tools/train/train.py --data DIR --out DIR [--preset base] [--steps N] [--seed S] ...

--data holds train.u16 / val.u16 / test.u16 (tools/train/build_tokenizer.py writes them).
Writes to --out: config.json, generation_config.json, model.safetensors (uint8 packed ternary
[out/4, in] + bf16 weight_scale [1], bf16 embeddings and norms, linear_class autobitlinear,
offline), log.json (loss curve, steps, time, validation and held-out test perplexity).

Architecture (docs/NUMERICS.md §6-§8): tied embeddings/head, per layer RMSNorm -> q/k/v BitLinear ->
RoPE (rotate_half) -> causal GQA attention -> attn_sub_norm -> o BitLinear -> residual,
RMSNorm -> relu(gate)^2 * up -> ffn_sub_norm -> down BitLinear -> residual; final RMSNorm.
BitLinear during training: absmean ternary weights and per-token absmax int8 activations
(127, eps 1e-5), both through a straight-through estimator (BitNet b1.58).

The held-out perplexity is computed on the *exported* model: weights re-read from the packed
tensors (ternary x bf16 scale, bf16 embeddings and norms), float32 arithmetic, windows of
max_position_embeddings tokens with stride = window (the first token of a window is context
only), exactly as tools/train/reference.py does with transformers and `bitnet perplexity` does.
"""
import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # ~26M parameters (24M ternary), ~10 MB packed
    "base": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536),
    "wide": dict(hidden=640, layers=8, heads=10, kv_heads=2, intermediate=1792),
    "deep": dict(hidden=512, layers=12, heads=8, kv_heads=2, intermediate=1280),
    "small": dict(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024),
    # speculative-decoding drafts for the default model (its tokenizer): ~6.2M and ~5.5M parameters
    "draft": dict(hidden=320, layers=4, heads=5, kv_heads=1, intermediate=1024),
    "draft2": dict(hidden=384, layers=2, heads=6, kv_heads=2, intermediate=1280),
    # for a CPU check of the code path
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172),
}
VOCAB = 4096
BOS_ID, EOS_ID, EOT_ID = 4093, 4094, 4095
RMS_EPS = 1e-5
ROPE_THETA = 10000.0


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return self.weight * h.to(dt)


def act_quant(x):
    """Per-token absmax int8 fake quantization (docs/NUMERICS.md §5), computed in float32."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (xf * s).round().clamp(-128, 127) / s


class BitLinear(nn.Module):
    """Training: STE over absmean ternary weights and int8 activations. After `freeze()`, the
    weight holds the exported ternary values and `scale` the exported (bf16) weight_scale, and
    the forward is transformers' AutoBitLinear offline: F.linear(ActQuant(x), W) * weight_scale."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.frozen = False
        self.register_buffer("scale", torch.ones(1), persistent=False)

    def forward(self, x):
        if self.frozen:
            return F.linear(act_quant(x).to(x.dtype), self.weight) * self.scale
        w = self.weight
        s = w.abs().mean().clamp(min=1e-5)
        wq = w + ((w / s).round().clamp(-1, 1) * s - w).detach()
        xq = x + (act_quant(x).to(x.dtype) - x).detach()
        return F.linear(xq, wq)

    def ternary(self):
        w = self.weight.detach().float()
        s = w.abs().mean().clamp(min=1e-5)
        return (w / s).round().clamp(-1, 1), s


def rope_cos_sin(T, hd, device):
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    f = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Layer(nn.Module):
    def __init__(self, c, dropout):
        super().__init__()
        H, hd = c["hidden"], c["hidden"] // c["heads"]
        self.nh, self.nkv, self.hd = c["heads"], c["kv_heads"], hd
        self.input_layernorm = RMSNorm(H)
        self.q_proj = BitLinear(H, self.nh * hd)
        self.k_proj = BitLinear(H, self.nkv * hd)
        self.v_proj = BitLinear(H, self.nkv * hd)
        self.attn_sub_norm = RMSNorm(self.nh * hd)
        self.o_proj = BitLinear(self.nh * hd, H)
        self.post_attention_layernorm = RMSNorm(H)
        self.gate_proj = BitLinear(H, c["intermediate"])
        self.up_proj = BitLinear(H, c["intermediate"])
        self.ffn_sub_norm = RMSNorm(c["intermediate"])
        self.down_proj = BitLinear(c["intermediate"], H)
        self.dropout = dropout

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)   # query head h uses kv head h // rep (HF repeat_kv)
        v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        a = self.o_proj(self.attn_sub_norm(a))
        x = x + F.dropout(a, self.dropout, self.training)
        h = self.post_attention_layernorm(x)
        m = F.relu(self.gate_proj(h)).square() * self.up_proj(h)
        m = self.down_proj(self.ffn_sub_norm(m))
        return x + F.dropout(m, self.dropout, self.training)


class BitNet(nn.Module):
    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(VOCAB, c["hidden"])
        self.layers = nn.ModuleList([Layer(c, dropout) for _ in range(c["layers"])])
        self.norm = RMSNorm(c["hidden"])
        self.dropout = dropout

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * self.c["layers"])
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = out_std if ("o_proj" in name or "down_proj" in name) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = rope_cos_sin(T, self.c["hidden"] // self.c["heads"], ids.device)
        x = F.dropout(self.embed_tokens(ids), self.dropout, self.training)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return F.linear(x, self.embed_tokens.weight)   # tied head, no activation quant


# ------------------------------------------------------------------------------------------
# Export (docs/NUMERICS.md §1-§4)
# ------------------------------------------------------------------------------------------
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def pack_ternary(t):
    """[out, in] in {-1,0,1} -> uint8 [out/4, in]: packed[r] = sum_i (t[i*R + r] + 1) << 2i."""
    out = t.shape[0]
    assert out % 4 == 0, out
    R = out // 4
    code = (t.to(torch.int32) + 1).to(torch.uint8)
    p = torch.zeros(R, t.shape[1], dtype=torch.uint8)
    for i in range(4):
        p |= code[i * R:(i + 1) * R] << (2 * i)
    return p


def unpack_ternary(p):
    return torch.cat([((p >> (2 * i)) & 3).to(torch.float32) - 1 for i in range(4)], dim=0)


def export_state(model):
    """The checkpoint tensors: bf16 embeddings/norms, packed uint8 ternary + bf16 weight_scale."""
    sd = {}
    c = model.c
    sd["model.embed_tokens.weight"] = model.embed_tokens.weight.detach().cpu().to(torch.bfloat16)
    sd["model.norm.weight"] = model.norm.weight.detach().cpu().to(torch.bfloat16)
    for l, layer in enumerate(model.layers):
        p = f"model.layers.{l}."
        for hf, mod in [("input_layernorm", layer.input_layernorm),
                        ("post_attention_layernorm", layer.post_attention_layernorm),
                        ("self_attn.attn_sub_norm", layer.attn_sub_norm),
                        ("mlp.ffn_sub_norm", layer.ffn_sub_norm)]:
            sd[p + hf + ".weight"] = mod.weight.detach().cpu().to(torch.bfloat16)
        for hf in LINEARS:
            mod = getattr(layer, hf.split(".")[1])
            t, s = mod.ternary()
            packed = pack_ternary(t.cpu())
            assert torch.equal(unpack_ternary(packed), t.cpu())
            sd[p + hf + ".weight"] = packed
            sd[p + hf + ".weight_scale"] = s.reshape(1).cpu().to(torch.bfloat16)
    assert c["intermediate"] % 4 == 0
    return sd


def frozen_model(sd, c, device):
    """A float32 model whose weights are exactly the exported checkpoint (for evaluation)."""
    m = BitNet(c, dropout=0.0)
    f = lambda k: sd[k].to(torch.float32)
    with torch.no_grad():
        m.embed_tokens.weight.copy_(f("model.embed_tokens.weight"))
        m.norm.weight.copy_(f("model.norm.weight"))
        for l, layer in enumerate(m.layers):
            p = f"model.layers.{l}."
            layer.input_layernorm.weight.copy_(f(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(f(p + "post_attention_layernorm.weight"))
            layer.attn_sub_norm.weight.copy_(f(p + "self_attn.attn_sub_norm.weight"))
            layer.ffn_sub_norm.weight.copy_(f(p + "mlp.ffn_sub_norm.weight"))
            for hf in LINEARS:
                mod = getattr(layer, hf.split(".")[1])
                mod.weight.copy_(unpack_ternary(sd[p + hf + ".weight"]))
                mod.scale = f(p + hf + ".weight_scale").clone()
                mod.frozen = True
    return m.to(device).eval()


def hf_config(c, max_pos):
    return {
        "architectures": ["BitNetForCausalLM"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "relu2",
        "hidden_size": c["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate"],
        "max_position_embeddings": max_pos,
        "model_type": "bitnet",
        "num_attention_heads": c["heads"],
        "num_hidden_layers": c["layers"],
        "num_key_value_heads": c["kv_heads"],
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"},
    }


def write_checkpoint(out, sd, c, max_pos):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(c, max_pos), f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, EOT_ID], "do_sample": False}, f, indent=2)
        f.write("\n")
    path = os.path.join(out, "model.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def window_nll(logits_fn, ids, window, stride=None):
    """Sum of -log p over the scored tokens and their count. Windows [b, b+window) for
    b = 0, stride, ...; window positions p > b with p >= the previous window's end are scored
    (the HF sliding-window recipe; with stride == window every token but each window's first)."""
    stride = stride or window
    n = len(ids)
    nll, count, prev_end, b = 0.0, 0, 0, 0
    while prev_end < n:
        e = min(b + window, n)
        w = torch.tensor(ids[b:e], dtype=torch.long)[None]
        logits = logits_fn(w)[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        first = max(b + 1, prev_end)
        for_pos = torch.arange(first, e)
        if len(for_pos):
            tgt = w[0, for_pos - b].to(lp.device)
            nll -= float(lp[for_pos - b - 1, tgt].sum())
            count += len(for_pos)
        prev_end = e
        b += stride
    return nll, count


def eval_stream_loss(model, data, seq, device, batch=32, autocast=True):
    """Mean next-token loss over non-overlapping seq-token chunks of a token stream (validation)."""
    model.eval()
    n = (len(data) - 1) // seq
    x = torch.from_numpy(data[: n * seq + 1].astype(np.int64))
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch):
            j = min(n, i + batch)
            inp = torch.stack([x[k * seq:(k + 1) * seq] for k in range(i, j)]).to(device)
            tgt = torch.stack([x[k * seq + 1:(k + 1) * seq + 1] for k in range(i, j)]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                logits = model(inp)
            tot += float(F.cross_entropy(logits.float().reshape(-1, VOCAB), tgt.reshape(-1), reduction="sum"))
            cnt += tgt.numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def greedy(model, ids, n, device):
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        t = int(torch.argmax(logits))
        if t in (EOS_ID, EOT_ID):
            break
        out.append(t)
        ids.append(t)
    return out


# ------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512, help="training length = max_position_embeddings")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate only the first N test tokens")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="safety net: stop training after this many seconds (the log says so)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    T0 = time.time()
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    c = dict(PRESETS[a.preset])
    rd = lambda s: np.fromfile(os.path.join(a.data, f"{s}.u16"), dtype=np.uint16)
    train, val, test = rd("train"), rd("val"), rd("test")
    if a.test_limit:
        test = test[: a.test_limit]

    model = BitNet(c, dropout=a.dropout)
    model.init_weights(a.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    fwd = torch.compile(model) if a.compile else model

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(a.seed + 1000)
    train_t = torch.from_numpy(train.astype(np.int64))
    n_start = len(train_t) - a.seq - 1
    log = {"args": vars(a), "config": c, "params": n_params, "ternary_params": n_ternary,
           "train_tokens": len(train), "val_tokens": len(val), "test_tokens": len(test),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "loss": [], "val": []}
    print(f"params {n_params/1e6:.2f}M (ternary {n_ternary/1e6:.2f}M), train tokens {len(train)}", flush=True)
    best = (float("inf"), -1, None)
    t_train = time.time()
    tokens_seen = 0
    for step in range(a.steps):
        starts = torch.randint(0, n_start, (a.batch,), generator=g)
        idx = starts[:, None] + torch.arange(a.seq + 1)[None, :]
        xy = train_t[idx].to(device, non_blocking=True)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = fwd(xy[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += a.batch * a.seq
        if step % 10 == 0 or step == a.steps - 1:
            lv = loss.item()
            log["loss"].append([step, round(lv, 4), round(time.time() - t_train, 2)])
            if step % 50 == 0:
                print(f"step {step} loss {lv:.4f} gn {float(gn):.2f} lr {lr_at(step):.2e} "
                      f"{tokens_seen / (time.time() - t_train):.0f} tok/s", flush=True)
        if (step + 1) % a.eval_every == 0 or step == a.steps - 1:
            vl = eval_stream_loss(fwd, val, a.seq, device)
            log["val"].append([step + 1, round(vl, 4), round(time.time() - t_train, 2)])
            print(f"  val loss {vl:.4f} ppl {math.exp(vl):.2f} at step {step + 1} "
                  f"({tokens_seen / len(train):.1f} epochs)", flush=True)
            if vl < best[0]:
                best = (vl, step + 1, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            if a.time_limit and time.time() - t_train > a.time_limit and step < a.steps - 1:
                log["stopped_early_at_step"] = step + 1
                print(f"time limit reached: stopping at step {step + 1} of {a.steps}", flush=True)
                break
    train_s = time.time() - t_train
    log.update(train_seconds=round(train_s, 1), steps=step + 1, tokens_seen=tokens_seen,
               epochs=tokens_seen / len(train), best_val_loss=best[0], best_step=best[1],
               final_train_loss=log["loss"][-1][1])
    print(f"trained {a.steps} steps in {train_s:.1f}s; best val loss {best[0]:.4f} at step {best[1]}", flush=True)

    model.load_state_dict(best[2])
    model.eval()
    sd = export_state(model)
    write_checkpoint(a.out, sd, c, a.seq)
    log["packed_bytes"] = os.path.getsize(os.path.join(a.out, "model.safetensors"))

    # held-out test perplexity of the exported (quantized) model, float32
    fm = frozen_model(sd, c, device)
    nll, cnt = window_nll(lambda w: fm(w.to(device)), test.tolist(), a.seq)
    log["test"] = {"tokens": len(test), "scored": cnt, "nll": nll, "mean_nll": nll / cnt,
                   "ppl": math.exp(nll / cnt), "window": a.seq, "stride": a.seq,
                   "model": "exported checkpoint, float32"}
    # the same with the training model's own quantization (fp32 master weights, fp32 scale)
    model.float()
    nll2, cnt2 = window_nll(lambda w: model(w.to(device)), test.tolist(), a.seq)
    log["test_training_model_fp32"] = {"ppl": math.exp(nll2 / cnt2), "scored": cnt2}
    print(f"test ppl (exported, fp32) {log['test']['ppl']:.3f}; training model fp32 "
          f"{log['test_training_model_fp32']['ppl']:.3f} over {cnt} tokens", flush=True)
    samples = []
    for prompt in ([BOS_ID] + test[1:9].tolist(), [BOS_ID]):
        samples.append({"prompt_ids": prompt, "greedy": greedy(fm, prompt, 40, device)})
    log["samples"] = samples
    log["total_seconds"] = round(time.time() - T0, 1)
    with open(os.path.join(a.out, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(json.dumps({k: log[k] for k in ("train_seconds", "steps", "epochs", "best_val_loss", "best_step",
                                          "packed_bytes", "total_seconds")}), flush=True)


if __name__ == "__main__":
    main()
