#!/usr/bin/env python3
"""ref_eval.py: an independent numpy reference of `clipdb eval` (test time only).

It recomputes the retrieval figures from scratch:
  - the ground truth from the captions file itself (captions.jsonl: the images
    of a split, their captions, repeated captions of one image kept once, as
    clipdb's ingest does);
  - the vectors from `clipdb embed` (texts and images encoded again, not read
    from the database);
  - scores in float64 numpy (cosine of normalised rows, dot product, negative
    Euclidean distance);
  - ranks as clipdb defines them (include/clipdb.h): 1 + the gallery items
    scoring higher + those scoring equal with a smaller item id; for
    image->text the best of the image's captions.
Only the item ids, needed for that tie rule, come from the database (sqlite3).

A query is AMBIGUOUS when another gallery item scores within `eps` of its right
item (float32 against float64 rounding could order them either way); callers
allow only those queries to differ.

usage: ref_eval.py --clipdb BIN --model DIR --captions FILE --images DIR --db DB
                   [--split S] [--metric cosine|dot|l2] [--pairs all|first]
prints a JSON object {"t2i": {...}, "i2t": {...}, "ranks": ..., "ambiguous": ...}.
"""
import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile

import numpy as np


def load_split(captions, images_dir, split=None, pairs="all"):
    """[(image abspath, [captions])] in file order, for the images present."""
    out = []
    with open(captions, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            e = json.loads(line)
            if split is not None and str(e.get("split")) != split:
                continue
            p = os.path.abspath(os.path.join(images_dir, e["image"]))
            if not os.path.exists(p):
                continue
            caps = []
            for c in e["captions"]:
                if c not in caps:
                    caps.append(c)
            if pairs == "first":
                caps = caps[:1]
            out.append((os.path.realpath(p), caps))
    return out


def embed(clipdb, model, texts=(), images=()):
    """float64 arrays of the embeddings `clipdb embed` prints. Texts go as
    --text arguments (a caption may hold a newline), 1000 per call."""
    t, i = [], []
    calls = [["--text", x] for x in texts]
    with tempfile.TemporaryDirectory() as d:
        if images:
            imf = os.path.join(d, "images.txt")
            with open(imf, "w", encoding="utf-8") as f:
                f.write("\n".join(images) + "\n")
        chunks = [sum(calls[k:k + 1000], []) for k in range(0, len(calls), 1000)]
        if images:
            chunks.append(["--images-from", imf])
        for args in chunks:
            r = subprocess.run([clipdb, "embed", "--model", str(model), "--json", "--truncate", *args],
                               capture_output=True, text=True, check=True)
            for line in r.stdout.splitlines():
                x = json.loads(line)
                (t if x["type"] == "text" else i).append(x["embedding"])
    return np.array(t, dtype=np.float64), np.array(i, dtype=np.float64)


def db_ids(db, entries):
    """Item ids of the images (by absolute path) and captions (by image and text)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    img = {}
    for i, p in con.execute("SELECT id, abspath FROM items WHERE type = 1"):
        img[os.path.realpath(p)] = i
    cap = {}
    for i, im, t in con.execute("SELECT id, image, text FROM items WHERE type = 2 AND image IS NOT NULL"):
        cap.setdefault((im, t), i)
    con.close()
    iid = [img[p] for p, _ in entries]
    cid = [cap[(img[p], c)] for p, cs in entries for c in cs]
    return np.array(iid, dtype=np.int64), np.array(cid, dtype=np.int64)


def scores(q, g, metric):
    """(nq, ng) scores, higher is better, in float64."""
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
        return qn @ gn.T
    if metric == "dot":
        return q @ g.T
    d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2 * q @ g.T
    return -np.sqrt(np.maximum(d2, 0))


def ranks(s, qlab, glab, gid, eps):
    """ranks (1-based, 0 for no right item) and an ambiguity flag per query."""
    nq = s.shape[0]
    r = np.zeros(nq, dtype=np.int64)
    amb = np.zeros(nq, dtype=bool)
    for i in range(nq):
        row = s[i]
        right = np.nonzero(glab == qlab[i])[0]
        if right.size == 0:
            continue
        top = row[right].max()
        cand = right[row[right] == top]
        b = cand[np.argmin(gid[cand])]
        sb, ib = row[b], gid[b]
        r[i] = 1 + int(np.sum(row > sb)) + int(np.sum((row == sb) & (gid < ib)))
        near = np.abs(row - sb) <= eps
        near[b] = False
        amb[i] = bool(near.any() and not np.all(row[near] == sb))
    return r, amb


def stats(r, ks, kmax):
    v = np.sort(r[r > 0])
    n = v.size
    out = {f"R@{k}": float(np.sum(v <= k)) / n for k in ks}
    out["median_rank"] = float(v[(n - 1) // 2])
    out["mean_rank"] = float(v.sum()) / n
    out["queries"] = int(n)
    curve = [[k, float(np.sum(v <= k)) / n] for k in range(1, kmax + 1)]
    return out, curve


def evaluate(clipdb, model, captions, images_dir, db, split=None, metric="cosine", pairs="all",
             ks=(1, 5, 10), curve_k=1000, vectors=None):
    entries = load_split(captions, images_dir, split, pairs)
    texts = [c for _, cs in entries for c in cs]
    paths = [p for p, _ in entries]
    if vectors is None:
        vectors = embed(clipdb, model, texts, paths)
    tv, iv = vectors
    iid, cid = db_ids(db, entries)
    cap_img = np.array([k for k, (_, cs) in enumerate(entries) for _ in cs], dtype=np.int64)
    img_lab = np.arange(len(entries), dtype=np.int64)
    ni, nc = len(entries), len(texts)
    s = scores(tv, iv, metric)  # (captions, images)
    eps = 1e-5 * max(1.0, float(np.abs(s).max()))
    rt, at = ranks(s, cap_img, img_lab, iid, eps)
    ri, ai = ranks(s.T.copy(), img_lab, cap_img, cid, eps)
    t2i, ct = stats(rt, ks, min(curve_k, ni))
    i2t, ci = stats(ri, ks, min(curve_k, nc))
    return {
        "images": ni, "captions": nc, "t2i": t2i, "i2t": i2t,
        "hit_rate": {"t2i": ct, "i2t": ci},
        "random": [[k, k / ni] for k in range(1, min(curve_k, ni) + 1)],
        "ranks": {"t2i": [[int(a), int(b)] for a, b in zip(cid, rt)],
                  "i2t": [[int(a), int(b)] for a, b in zip(iid, ri)]},
        "ambiguous": {"t2i": [int(a) for a in cid[at]], "i2t": [int(a) for a in iid[ai]]},
    }, vectors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clipdb", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--captions", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--split")
    ap.add_argument("--metric", default="cosine", choices=["cosine", "dot", "l2"])
    ap.add_argument("--pairs", default="all", choices=["all", "first"])
    a = ap.parse_args()
    res, _ = evaluate(a.clipdb, a.model, a.captions, a.images, a.db, a.split, a.metric, a.pairs)
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
