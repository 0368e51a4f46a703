#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of models/kjv-fortunes and pre-tokenize the corpus.

    python3 tools/train/build_tokenizer.py --corpus DIR --out DIR [--vocab 4096]
    python3 tools/train/build_tokenizer.py --corpus DIR --reuse MODEL_DIR

With --reuse, the tokenizer of MODEL_DIR (models/kjv-fortunes) encodes the corpus instead of a new
one being learned: the token streams of a draft model that shares the default model's tokenizer.

Reads DIR/train.jsonl (only the training split is used to learn merges), writes the tokenizer
files (tokenizer.json, tokenizer_config.json, chat_template.jinja) to
--out, and token streams for training to --corpus:
  train.u16, val.u16   uint16 little-endian, every document as <|begin_of_text|> text <|end_of_text|>
  test.u16             tokenizer(test.txt) with add_special_tokens=True (one BOS, then the text):
                       exactly what `bitnet perplexity --file test.txt` and transformers evaluate.
"""
import argparse
import json
import os

import numpy as np

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"

# Llama-3 pre-tokenizer split regex (as in the Llama 3 / 2B4T tokenizer.json)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The 2B4T prompt format (transformers' BitNetForCausalLM docstring):
#   <|begin_of_text|>User: ...<|eot_id|>Assistant: ...
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def docs(path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)["text"]


def main():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out")
    ap.add_argument("--reuse", help="encode with MODEL_DIR/tokenizer.json instead of learning one")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=512)
    a = ap.parse_args()
    n_bpe = a.vocab - 3
    bos_id, eos_id, eot_id = n_bpe, n_bpe + 1, n_bpe + 2
    if a.reuse:
        tok = Tokenizer.from_file(os.path.join(a.reuse, "tokenizer.json"))
        assert tok.get_vocab_size() == a.vocab and tok.token_to_id(BOS) == bos_id
        encode(tok, a.corpus, a.vocab, (bos_id, eos_id, eot_id),
               lambda text: tok.encode(text).ids, lambda ids: tok.decode(ids, skip_special_tokens=False))
        return
    if not a.out:
        ap.error("--out is required unless --reuse is given")
    os.makedirs(a.out, exist_ok=True)

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(docs(os.path.join(a.corpus, "train.jsonl")), trainer=trainer)
    assert tok.get_vocab_size() == n_bpe, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (BOS, EOS, EOT)])
    assert (tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(EOT)) == (bos_id, eos_id, eot_id)
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT,
                                 model_max_length=a.max_len, chat_template=CHAT_TEMPLATE,
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(a.out)
    # transformers 5.x writes the template to chat_template.jinja; 4.x-era repos (2B4T) keep it in
    # tokenizer_config.json. Put it in both places (identical text).
    p = os.path.join(a.out, "tokenizer_config.json")
    tc = json.load(open(p))
    tc["chat_template"] = CHAT_TEMPLATE
    with open(p, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")

    encode(tok, a.corpus, a.vocab, (bos_id, eos_id, eot_id),
           lambda text: hf(text)["input_ids"], lambda ids: hf.decode(ids))


def encode(tok, corpus, vocab, special, encode_test, decode):
    """Writes train.u16, val.u16 (documents between BOS and EOS) and test.u16 (the test text with
    the tokenizer's own BOS) under `corpus`, and tokens.json with the counts."""
    bos_id, eos_id, eot_id = special
    stats = {"vocab_size": vocab, "bos_token_id": bos_id, "eos_token_id": eos_id, "eot_token_id": eot_id}
    for split in ("train", "val"):
        ids = []
        texts = list(docs(os.path.join(corpus, f"{split}.jsonl")))
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.append(bos_id)
            ids.extend(enc.ids)
            ids.append(eos_id)
        arr = np.array(ids, dtype=np.uint16)
        arr.tofile(os.path.join(corpus, f"{split}.u16"))
        stats[f"{split}_tokens"] = len(arr)
        stats[f"{split}_chars_per_token"] = sum(map(len, texts)) / (len(arr) - 2 * len(texts))
    test = open(os.path.join(corpus, "test.txt")).read()
    ids = encode_test(test)
    assert ids[0] == bos_id and decode(ids[1:]) == test
    np.array(ids, dtype=np.uint16).tofile(os.path.join(corpus, "test.u16"))
    stats["test_tokens"] = len(ids)
    with open(os.path.join(corpus, "tokens.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
