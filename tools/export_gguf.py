#!/usr/bin/env python3
"""Exports a safetensors checkpoint (one of the test fixtures) to GGUF the way the converters
users run lay it out, for the loader's tests: llama.cpp's tensor names and metadata, the
ternary linears as TQ1_0 / TQ2_0 (llama.cpp), I2_S (bitnet.cpp: 128-element blocks, one f32
scale after the codes) or ternary-valued F16/F32, the embedding and head as F32 / F16 / BF16 /
Q8_0 / Q6_K, and the byte-level BPE tokenizer in `tokenizer.ggml.*` metadata.

Architectures: `bitnet-25` for BitNet b1.58 (relu², sub-norms), `bitnet` for 1bitLLM's
BitnetForCausalLM (SiLU, sub-norms), `llama` for Llama-BitNet (q and k rows interleaved per
head, as llama.cpp's converter writes them).

Usage:
    python3 tools/export_gguf.py FIXTURE_DIR OUT.gguf [--ternary tq2_0|tq1_0|i2_s|f16|f32]
        [--embed f16|bf16|f32|q8_0|q6_k] [--head f16|bf16|f32|q8_0|q6_k] [--arch bitnet]
`--arch bitnet` writes a BitNet b1.58 checkpoint under the older `bitnet` architecture (the
only one bitnet.cpp's 2024 llama.cpp fork loads; its FFN gates by SiLU instead of relu², the
same work per token), for speed races. Without a tokenizer.json (a `bitnet synth` model) the
file declares no vocabulary (`no_vocab`), which llama-bench accepts.
Needs numpy and gguf.
"""
import argparse
import json
import struct
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
I2_S = 36


def read_safetensors(path):
    """name -> float32 or uint8 array (bf16/f16/f32 widened to f32)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = data[a:b]
        dt = info["dtype"]
        if dt == "BF16":
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            arr = np.frombuffer(buf, np.float16).astype(np.float32)
        elif dt == "F32":
            arr = np.frombuffer(buf, np.float32)
        elif dt == "U8":
            arr = np.frombuffer(buf, np.uint8)
        else:
            raise SystemExit(f"{name}: dtype {dt} not handled")
        out[name] = arr.reshape(info["shape"])
    return out


def family_of(cfg):
    if "BitnetForCausalLM" in cfg.get("architectures", []):
        return "bitnet"
    return "llama" if cfg.get("model_type") == "llama" else "bitnet-25"


def ternary(t, prefix, cfg):
    """Codes (-1/0/1, [rows, cols]) and the per-tensor real scale of a linear, in the f32
    arithmetic the engine's safetensors loader uses (so the two forms agree bit for bit)."""
    w = t[f"{prefix}.weight"]
    one = np.float32(1.0)
    if w.dtype == np.uint8:
        codes = np.concatenate([((w >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)])
        ws = np.float32(t[f"{prefix}.weight_scale"].reshape(-1)[0])
        qc = cfg.get("quantization_config") or {}
        return codes, (ws if qc.get("linear_class") == "autobitlinear" else one / ws)
    w = w.astype(np.float32)
    mean = np.float32(max(float(np.abs(w.astype(np.float64)).sum()) / w.size, 1e-5))
    s = one / mean
    codes = np.clip(np.round(w * s), -1, 1).astype(np.int8)
    return codes, one / s


def interleave_heads(m, head_dim):
    """llama.cpp's permute of q/k rows: the two halves of each head interleaved."""
    rows = m.shape[0]
    return m.reshape(rows // head_dim, 2, head_dim // 2, *m.shape[1:]).swapaxes(1, 2).reshape(m.shape)


def pack_i2s(codes, scale):
    """bitnet.cpp's I2_S: 128-element blocks of 32 bytes (byte j holds elements j, j+32, j+64,
    j+96 in bits 7:6 .. 1:0, code = w + 1), then the f32 scale padded to 32 bytes."""
    flat = (codes.reshape(-1) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (flat[:, 0] << 6) | (flat[:, 1] << 4) | (flat[:, 2] << 2) | flat[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def q6_k(x):
    """A Q6_K encoding (per-16 int8 scales, per-256 f16 scale), checked against gguf's decoder."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    out = np.zeros((blocks.shape[0], 210), np.uint8)
    for bi, b in enumerate(blocks):
        sub = b.reshape(16, 16)
        amax = np.abs(sub).max(axis=1)
        d = np.float16(max(amax.max() / 31.0 / 127.0, 1e-7))
        sc = np.clip(np.ceil(amax / 31.0 / np.float32(d)), 1, 127).astype(np.int8)
        step = np.float32(d) * sc.astype(np.float32)
        q = (np.clip(np.round(sub / step[:, None]), -32, 31) + 32).astype(np.uint8).reshape(256)
        ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
        for h in range(2):
            qq = q[128 * h:128 * (h + 1)]
            for j in range(4):
                part = qq[32 * j:32 * (j + 1)]
                idx = np.arange(32) + 64 * h + 32 * (j % 2)
                ql[idx] |= (part & 0xF) << (4 * (j // 2))
                qh[np.arange(32) + 32 * h] |= (part >> 4) << (2 * j)
        out[bi] = np.concatenate([ql, qh, sc.view(np.uint8), np.frombuffer(d.tobytes(), np.uint8)])
    back = quants.dequantize(out.reshape(x.shape[0], -1), Q.Q6_K).reshape(x.shape)
    assert np.abs(back - x).max() <= np.abs(x).max() / 60 + 1e-6, "Q6_K encoding off"
    return out.reshape(x.shape[0], -1)


def add_float(w, name, arr, kind):
    arr = np.ascontiguousarray(arr, np.float32)
    if kind == "f32":
        w.add_tensor(name, arr)
    elif kind == "f16":
        w.add_tensor(name, arr.astype(np.float16))
    elif kind == "bf16":
        w.add_tensor(name, quants.quantize(arr, Q.BF16), raw_dtype=Q.BF16)
    elif kind == "q8_0":
        w.add_tensor(name, quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
    elif kind == "q6_k":
        w.add_tensor(name, q6_k(arr), raw_dtype=Q.Q6_K)
    else:
        raise SystemExit(f"unknown float type {kind}")


def add_ternary(w, name, codes, scale, kind, i2s_names):
    vals = codes.astype(np.float32) * np.float32(scale)
    if kind in ("tq1_0", "tq2_0"):
        qt = Q.TQ1_0 if kind == "tq1_0" else Q.TQ2_0
        w.add_tensor(name, quants.quantize(vals, qt), raw_dtype=qt)
    elif kind == "i2_s":
        data = pack_i2s(codes, scale)
        w.add_tensor(name, data.reshape(1, -1), raw_dtype=Q.I8)
        i2s_names.append((name, codes.shape))
    elif kind == "f16":
        w.add_tensor(name, vals.astype(np.float16))
    else:
        w.add_tensor(name, vals)


def patch_i2s(path, entries):
    """Rewrites the placeholder I8 entries of I2_S tensors: dims [cols, rows], type 36."""
    raw = bytearray(Path(path).read_bytes())
    for name, (rows, cols) in entries:
        key = struct.pack("<Q", len(name)) + name.encode()
        at = raw.find(key)
        assert at >= 0 and raw.find(key, at + 1) < 0, name
        p = at + len(key)
        assert struct.unpack_from("<I", raw, p)[0] == 2, name
        struct.pack_into("<QQI", raw, p + 4, cols, rows, I2_S)
    Path(path).write_bytes(bytes(raw))


def add_tokenizer(w, src, cfg):
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for a in tok.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        special[a["id"]] = a.get("special", False)
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens), "vocabulary ids have gaps"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if special.get(i) else (4 if i in special else 1) for i in range(len(tokens))])
    w.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
        w.add_add_bos_token(True)
    if cfg.get("eos_token_id") is not None:
        eos = cfg["eos_token_id"]
        w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    template = None
    if (src / "chat_template.jinja").exists():
        template = (src / "chat_template.jinja").read_text()
    elif (src / "tokenizer_config.json").exists():
        template = json.loads((src / "tokenizer_config.json").read_text()).get("chat_template")
    if template:
        w.add_chat_template(template)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--ternary", default="tq2_0", choices=["tq2_0", "tq1_0", "i2_s", "f16", "f32"])
    ap.add_argument("--embed", default="f16", choices=["f16", "bf16", "f32", "q8_0", "q6_k"])
    ap.add_argument("--head", default="f16", choices=["f16", "bf16", "f32", "q8_0", "q6_k"])
    ap.add_argument("--arch", choices=["bitnet", "bitnet-25", "llama"],
                    help="architecture written (default: the checkpoint's own)")
    args = ap.parse_args()
    src = Path(args.src)
    cfg = json.loads((src / "config.json").read_text())
    t = read_safetensors(src / "model.safetensors")
    family = family_of(cfg)
    arch = args.arch or family
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or h // heads
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(args.out, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(h)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    if (src / "tokenizer.json").exists():
        add_tokenizer(w, src, cfg)
    else:
        w.add_tokenizer_model("no_vocab")
    i2s = []
    add_float(w, "token_embd.weight", t["model.embed_tokens.weight"], args.embed)
    if "lm_head.weight" in t and not cfg.get("tie_word_embeddings", False):
        add_float(w, "output.weight", t["lm_head.weight"], args.head)
    add_float(w, "output_norm.weight", t["model.norm.weight"], "f32")
    sub = {"bitnet-25": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
           "bitnet": ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")}.get(family)
    for l in range(cfg["num_hidden_layers"]):
        p, g = f"model.layers.{l}", f"blk.{l}"
        add_float(w, f"{g}.attn_norm.weight", t[f"{p}.input_layernorm.weight"], "f32")
        add_float(w, f"{g}.ffn_norm.weight", t[f"{p}.post_attention_layernorm.weight"], "f32")
        if sub:
            add_float(w, f"{g}.attn_sub_norm.weight", t[f"{p}.{sub[0]}.weight"], "f32")
            add_float(w, f"{g}.ffn_sub_norm.weight", t[f"{p}.{sub[1]}.weight"], "f32")
        for hf, name in PROJ.items():
            codes, scale = ternary(t, f"{p}.{hf}", cfg)
            if arch == "llama" and name in ("attn_q", "attn_k"):
                codes = interleave_heads(codes, head_dim)
            add_ternary(w, f"{g}.{name}.weight", codes, scale, args.ternary, i2s)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if i2s:
        patch_i2s(args.out, i2s)
    print(f"wrote {args.out} ({arch}, ternary {args.ternary}, embed {args.embed}, head {args.head})")


if __name__ == "__main__":
    main()
