"""`clipdb eval` against an independent numpy evaluation (tools/ref_eval.py).

The reference takes its ground truth from the captions file, its vectors from
`clipdb embed` (encoded again, not read from the database) and computes every
score in float64. Per-query ranks must be equal, except for queries the
reference marks ambiguous (another item within 1e-5 of the right one, where
float32 rounding may order them either way); every figure (R@K, median and
mean rank, hit-rate curves, random baseline) must then equal the one computed
from the ranks, to the last digit printed (the JSON prints doubles exactly;
the text table prints R@K with 4 decimals and the mean rank with 2). Data: the
COCO subset (whole, the val2017 split, --pairs first) and Flickr8k test (with
dev images in the database too, so the split filter matters), generated tiny
model ("random weights").
"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, gen_model, run

sys.path.insert(0, str(ROOT / "tools"))
import ref_eval  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", seed=5)


@pytest.fixture(scope="module")
def coco(shared, tmp_path_factory, model):
    d = shared / "data" / "coco-subset"
    db = tmp_path_factory.mktemp("coco") / "coco.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--images", d / "images", "--captions", d / "captions.jsonl", "-q", check=True)
    return d, db


@pytest.fixture(scope="module")
def flickr(shared, tmp_path_factory, model):
    """The Flickr8k test split (1,000 images) and 40 dev images, as links."""
    src = shared / "data" / "flickr8k"
    base = tmp_path_factory.mktemp("flickr")
    imgs = base / "images"
    imgs.mkdir()
    lines, dev = [], 0
    with open(src / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            e = json.loads(line)
            if e["split"] == "test" or (e["split"] == "dev" and dev < 40):
                dev += e["split"] == "dev"
                os.symlink(src / "images" / e["image"], imgs / e["image"])
                lines.append(line.rstrip("\n"))
    caps = base / "captions.jsonl"
    caps.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = base / "flickr.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--images", imgs, "--captions", caps, "-q", check=True)
    return base, db


def stats_from(ranks, ks, kmax):
    v = np.sort(np.array([r for r in ranks if r > 0]))
    n = v.size
    out = {f"R@{k}": float(np.sum(v <= k)) / n for k in ks}
    out["median_rank"] = float(v[(n - 1) // 2])
    out["mean_rank"] = float(v.sum()) / n
    return out, [[k, float(np.sum(v <= k)) / n] for k in range(1, kmax + 1)]


def check(model, data_dir, db, split=None, metric="cosine", pairs="all", vectors=None):
    args = ["eval", db, "--metric", metric, "--pairs", pairs, "--no-index", "--samples", "0"]
    if split:
        args += ["--split", split]
    got = json.loads(run(*args, "--json", check=True).stdout)
    text = run(*args, check=True).stdout
    ref, vectors = ref_eval.evaluate(os.environ.get("CLIPDB_BIN", str(ROOT / "build" / "clipdb")),
                                     model, data_dir / "captions.jsonl", data_dir / "images", db,
                                     split, metric, pairs, vectors=vectors)
    assert got["images"] == ref["images"] and got["captions"] == ref["captions"]
    flips = 0
    for d in ("t2i", "i2t"):
        mine = dict(map(tuple, got["ranks"][d]))
        theirs = dict(map(tuple, ref["ranks"][d]))
        assert mine.keys() == theirs.keys()
        amb = set(ref["ambiguous"][d])
        bad = [k for k in mine if mine[k] != theirs[k] and k not in amb]
        assert not bad, (d, metric, [(k, mine[k], theirs[k]) for k in bad[:5]])
        flips += sum(mine[k] != theirs[k] for k in mine)
        # the figures from the reference's ranks, an ambiguous query taking clipdb's order
        ranks = [mine[k] if k in amb else theirs[k] for k in theirs]
        kmax = len(got["hit_rate"][d][metric])
        want, curve = stats_from(ranks, (1, 5, 10), kmax)
        for key, v in want.items():
            assert got[d][key] == pytest.approx(v, rel=1e-13, abs=0), (d, key)
        assert np.allclose(np.array(got["hit_rate"][d][metric]), np.array(curve), rtol=0, atol=1e-15)
        # the text table, digit for digit
        row = [l for l in text.splitlines() if l.startswith("text->image" if d == "t2i" else "image->text")][0]
        cells = row.split()[1:]
        assert cells[:3] == [f"{want[f'R@{k}']:.4f}" for k in (1, 5, 10)], (row, want)
        assert cells[4] == f"{want['mean_rank']:.2f}", (row, want)
    assert got["random"] == [[k, pytest.approx(k / ref["images"], rel=1e-15)]
                             for k in range(1, len(got["random"]) + 1)]
    print(f"\n{db.name} split={split} {metric} {pairs}: t2i R@1/5/10 "
          f"{got['t2i']['R@1']:.4f}/{got['t2i']['R@5']:.4f}/{got['t2i']['R@10']:.4f}, "
          f"i2t {got['i2t']['R@1']:.4f}/{got['i2t']['R@5']:.4f}/{got['i2t']['R@10']:.4f}, "
          f"ambiguous-order queries that differ: {flips}")
    return vectors


def test_coco_all_metrics(model, coco):
    d, db = coco
    vec = None
    for metric in ("cosine", "dot", "l2"):
        vec = check(model, d, db, metric=metric, vectors=vec)


def test_coco_split_and_pairs_first(model, coco):
    d, db = coco
    check(model, d, db, split="val2017")
    check(model, d, db, split="train2017", metric="l2", pairs="first")


def test_flickr8k_test(model, flickr):
    d, db = flickr
    vec = None
    for metric in ("cosine", "dot", "l2"):
        vec = check(model, d, db, split="test", metric=metric, vectors=vec)
    check(model, d, db, split="test", pairs="first")
