#!/usr/bin/env python3
"""Rebuild the training corpus of models/kjv-fortunes from Debian packages.

    python3 tools/train/build_corpus.py --debs DIR --out DIR

DIR must hold the .deb files of `bible-kjv-text`, `bible-kjv` (only its `bible` program is used,
to decompress the text) `fortunes` and `fortunes-min` (fetch them with
`apt-get download bible-kjv-text bible-kjv fortunes fortunes-min`; with --download the script runs
that itself). Nothing else is read.

Documents:
  * King James Bible: one document per chapter (1189), verse references removed, one verse a line.
  * fortunes: one document per fortune cookie (the `%`-separated entries) of every English file of
    `fortunes` and `fortunes-min`, except `ascii-art` (pictures) and `ethnic`.
Split (deterministic, by document index within each source): index % 50 == 49 -> test,
index % 50 == 24 -> validation (used only to pick the best checkpoint), everything else -> train.

Output under --out:
  train.jsonl, val.jsonl, test.jsonl   one {"source", "name", "text"} object per document
  test.txt                             the test documents joined by a blank line (the held-out
                                       perplexity text)
  manifest.json                        package versions, file list, sizes, sha256 of every output
"""
import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

FORTUNE_EXCLUDE = {"ascii-art", "ethnic"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def deb_version(deb):
    return subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def find_deb(debs, name):
    hits = sorted(p for p in glob.glob(os.path.join(debs, f"{name}_*.deb")))
    if len(hits) != 1:
        sys.exit(f"expected exactly one {name}_*.deb in {debs}, found {hits}")
    return hits[0]


def bible_chapters(x):
    """Decompress the KJV with the package's own program; returns [(ref, text)] per chapter."""
    prog = os.path.join(x, "usr/bin/bible")
    data = os.path.join(x, "usr/lib")
    out = subprocess.run([prog, "-p", data, "-f", "-m", "8000000", "gen1:1-rev22:21"],
                         check=True, capture_output=True, text=True).stdout
    chapters = []
    cur_key, verses = None, []
    for line in out.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if not m:
            sys.exit(f"unexpected bible line: {line!r}")
        book, chap, _verse, text = m.groups()
        key = f"{book}{chap}"
        if key != cur_key:
            if verses:
                chapters.append((cur_key, "\n".join(verses)))
            cur_key, verses = key, []
        verses.append(text.strip())
    chapters.append((cur_key, "\n".join(verses)))
    return chapters


def fortunes(x):
    docs = []
    for path in sorted(glob.glob(os.path.join(x, "usr/share/games/fortunes/*"))):
        name = os.path.basename(path)
        if name.endswith(".dat") or name.endswith(".u8") or name in FORTUNE_EXCLUDE:
            continue
        raw = open(path, "rb").read().decode("utf-8", errors="strict")
        for i, entry in enumerate(raw.split("\n%\n")):
            text = entry.strip("\n%").rstrip()
            if text.strip():
                docs.append((f"{name}#{i}", text.expandtabs(8)))
    return docs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--debs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--download", action="store_true", help="apt-get download the packages into --debs")
    a = ap.parse_args()
    os.makedirs(a.debs, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    pkgs = ["bible-kjv-text", "bible-kjv", "fortunes", "fortunes-min"]
    if a.download:
        subprocess.run(["apt-get", "download"] + pkgs, check=True, cwd=a.debs)
    debs = {p: find_deb(a.debs, p) for p in pkgs}
    with tempfile.TemporaryDirectory() as tmp:
        x = os.path.join(tmp, "root")
        for p, d in debs.items():
            subprocess.run(["dpkg-deb", "-x", d, x], check=True)
        sources = {"kjv": bible_chapters(x), "fortunes": fortunes(x)}
    splits = {"train": [], "val": [], "test": []}
    for src, docs in sources.items():
        for i, (name, text) in enumerate(docs):
            split = "test" if i % 50 == 49 else "val" if i % 50 == 24 else "train"
            splits[split].append({"source": src, "name": name, "text": text})
    outputs = {}
    for split, docs in splits.items():
        p = os.path.join(a.out, f"{split}.jsonl")
        with open(p, "w") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        outputs[p] = docs
    test_txt = os.path.join(a.out, "test.txt")
    with open(test_txt, "w") as f:
        f.write("\n\n".join(d["text"] for d in splits["test"]) + "\n")
    manifest = {
        "packages": {p: {"file": os.path.basename(d), "version": deb_version(d), "sha256": sha256(d)}
                     for p, d in debs.items()},
        "fortune_files_excluded": sorted(FORTUNE_EXCLUDE),
        "split_rule": "per source, document index i: i % 50 == 49 -> test, i % 50 == 24 -> val, else train",
        "counts": {s: {src: sum(1 for d in docs if d["source"] == src) for src in sources}
                   for s, docs in splits.items()},
        "chars": {s: sum(len(d["text"]) for d in docs) for s, docs in splits.items()},
        "outputs": {os.path.basename(p): sha256(p) for p in list(outputs) + [test_txt]},
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(json.dumps({k: manifest[k] for k in ("counts", "chars")}, indent=1))


if __name__ == "__main__":
    main()
