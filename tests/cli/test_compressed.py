"""Black-box tests of compressed copies (`clipdb index DB --compress
sq8|bf16|fp16 | --drop`): exact search on a copy returns the fp32 scan's top-k
(ids, and scores to float rounding) on a 20k clustered random set (one query
at a time: the SIMD kernels; 40 at once: the int8 / bf16 GEMM path) and on
the COCO subset, the copy follows add and rm, read-only opens use it, an old
database opens unchanged, and recall@10 on Flickr8k vectors of a generated
model."""
import json
import shutil
import sqlite3
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, one_line_failure, run

GEN = ROOT / "tools" / "gen_model.py"
PY = "/usr/bin/python3"
KINDS = ("sq8", "bf16", "fp16")
METRICS = ("cosine", "dot", "l2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    subprocess.run([PY, str(GEN), str(d), "--size", "tiny", "--keys", "openai", "--dtype", "F32",
                    "--seed", "1"], check=True, capture_output=True)
    return d


def random_db(path, model, n, seed):
    """A database of n clustered random text vectors (the model's dimension),
    written straight into the tables `clipdb add` fills (no encoding)."""
    run("init", path, "--model", model, check=True)
    con = sqlite3.connect(path)
    d = json.loads(run("stats", path, "--json", check=True).stdout)["dim"]
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(50, d)).astype(np.float32)
    x = (c[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, d)) + 0.3).astype(np.float32)
    now = int(time.time())
    con.executemany("INSERT INTO items(id, type, text, added_at) VALUES(?, 2, ?, ?)",
                    [(i + 1, f"t{i}", now) for i in range(n)])
    con.executemany("INSERT INTO vectors_text(id, norm, vec) VALUES(?, ?, ?)",
                    [(i + 1, float(np.sqrt(np.sum(x[i].astype(np.float64) ** 2))), x[i].tobytes())
                     for i in range(n)])
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def rdb(tmp_path_factory, model):
    return random_db(tmp_path_factory.mktemp("rdb") / "r.db", model, 20000, 1)


def search(db, *args):
    r = run("search", db, "--json", *args, check=True)
    return json.loads(r.stdout)


def hits(res):
    """[[(id, score)] per query] of a --json search (single or --batch)."""
    qs = res["queries"] if "queries" in res else [res]
    return [[(h["id"], h["score"]) for h in q["results"]] for q in qs]


def agree(a, b, k):
    """recall@k of a against b; asserts the shared ids have equal scores."""
    found = 0
    for qa, qb in zip(a, b):
        sb = dict(qb)
        for i, s in qa:
            if i in sb:
                found += 1
                assert abs(s - sb[i]) <= 2e-5 * (1 + abs(s)), (i, s, sb[i])
    return found / (k * len(b))


def batch_file(tmp_path, lines):
    p = tmp_path / "q.txt"
    p.write_text("".join(f"{x}\n" for x in lines))
    return p


@pytest.mark.parametrize("kind", KINDS)
def test_random_20k_equals_the_fp32_scan(rdb, tmp_path, kind):
    run("index", rdb, "--compress", kind, "--target", "text", check=True)
    st = json.loads(run("stats", rdb, "--json", check=True).stdout)
    assert st["compressed"] == [{"space": "base", "target": "text", "kind": kind, "dim": st["dim"]}]
    items = [1 + (i * 7919) % 20000 for i in range(40)]
    qf = batch_file(tmp_path, [f"item:{i}" for i in items])
    for metric in METRICS:
        base = ("--target", "text", "-k", "10", "--metric", metric)
        got = search(rdb, "--batch", qf, *base)          # 40 queries: the GEMM path
        ref = search(rdb, "--batch", qf, *base, "--no-compressed")
        assert got["scan"] == kind and ref["scan"] == "fp32"
        assert agree(hits(got), hits(ref), 10) >= 0.999, metric
        for i in items[:6]:                               # one query: the dot kernels
            g = hits(search(rdb, "--item", i, *base))
            r = hits(search(rdb, "--item", i, *base, "--no-compressed"))
            assert [x for x, _ in g[0]] == [x for x, _ in r[0]], (metric, i)
            if metric != "dot":                            # a stored item finds itself first
                assert g[0][0][0] == i
            if metric == "l2":
                assert g[0][0][1] == 0.0                   # at distance exactly 0


def test_stats_text_drop_and_bad_options(rdb, tmp_path):
    run("index", rdb, "--compress", "sq8", "--target", "text", check=True)
    out = run("stats", rdb, check=True).stdout
    assert "compressed sq8 copy of the text vectors of set base" in out
    r = run("search", rdb, "--item", "3", "--target", "text", "--stats", check=True)
    assert "scan: sq8 copy (" in r.stderr and "+ fp32 re-rank" in r.stderr
    r = run("search", rdb, "--item", "3", "--target", "text", "--stats", "--no-compressed",
            check=True)
    assert "scan: fp32" in r.stderr
    # no --target: the targets with vectors (only texts here)
    r = run("index", rdb, "--drop", check=True)
    assert "dropped the compressed copy of the text vectors" in r.stdout
    assert json.loads(run("stats", rdb, "--json", check=True).stdout)["compressed"] == []
    assert search(rdb, "--item", "3", "--target", "text")["scan"] == "fp32"
    one_line_failure(run("index", rdb, "--drop", "--target", "text"), "index", "no compressed copy")
    for args, msg in ((("--compress", "int4"), "sq8, bf16 or fp16"),
                      (("--compress", "sq8", "--ivf"), "say which"),
                      (("--ivf", "--space", "x"), "--space goes with")):
        r = run("index", rdb, *args)
        assert r.returncode == 2 and msg in r.stderr and "Sanitizer" not in r.stderr, r.stderr
    one_line_failure(run("index", rdb, "--compress", "sq8", "--space", "nosuch"), "index",
                     "nosuch")
    one_line_failure(run("index", rdb, "--compress", "sq8", "--target", "image"), "index",
                     "no image vectors")


def test_add_rm_keep_the_copy_current_and_corrupt_rows(tmp_path, model):
    db = random_db(tmp_path / "a.db", model, 3000, 2)
    run("index", db, "--compress", "sq8", "--target", "text", check=True)
    texts = tmp_path / "t.txt"
    texts.write_text("a dog running on the beach\na red bus in the street\n")
    run("add", db, "--texts", texts, check=True)
    con = sqlite3.connect(db)
    new = [r[0] for r in con.execute("SELECT id FROM items WHERE text LIKE 'a %' ORDER BY id")]
    assert len(new) == 2
    for metric in METRICS:
        for i in new:  # quantised with the stored ranges at load (clamped where outside)
            g = search(db, "--item", i, "--target", "text", "--metric", metric)
            r = search(db, "--item", i, "--target", "text", "--metric", metric, "--no-compressed")
            assert g["scan"] == "sq8" and (metric == "dot" or g["results"][0]["id"] == i)
            assert [h["id"] for h in g["results"]] == [h["id"] for h in r["results"]]
    run("rm", db, str(new[0]), check=True)
    g = search(db, "--item", new[1], "--target", "text", "-k", "3000")
    assert new[0] not in [h["id"] for h in g["results"]] and g["scan"] == "sq8"
    # a damaged row: a clean failure naming it, nothing lost
    con.execute("UPDATE compressed SET ranges = x'00' WHERE target = 2")
    con.commit()
    one_line_failure(run("search", db, "--item", new[1], "--target", "text"), "search",
                     "corrupt compressed copy")
    assert search(db, "--item", new[1], "--target", "text", "--no-compressed")["scan"] == "fp32"
    con.execute("UPDATE compressed SET kind = 9 WHERE target = 2")
    con.commit()
    one_line_failure(run("search", db, "--item", new[1], "--target", "text"), "search", "corrupt")
    run("index", db, "--compress", "bf16", "--target", "text", check=True)
    assert search(db, "--item", new[1], "--target", "text")["scan"] == "bf16"
    con.close()


def test_read_only_file_and_old_fixture(tmp_path, model, rdb):
    ro = tmp_path / "ro.db"
    shutil.copy(rdb, ro)
    run("index", ro, "--compress", "fp16", "--target", "text", check=True)
    ro.chmod(0o444)
    assert search(ro, "--item", "9", "--target", "text")["scan"] == "fp16"
    # the v1 fixture (no table of copies): opens and searches as before
    fx = ROOT / "tests" / "fixtures" / "v1-tiny-seed1.db"
    old = tmp_path / "old.db"
    shutil.copy(fx, old)
    st = json.loads(run("stats", old, "--json", check=True).stdout)
    assert st["compressed"] == []
    tgt = "image" if st["images"] else "text"
    con = sqlite3.connect(old)
    first = con.execute(f"SELECT min(id) FROM vectors_{tgt}").fetchone()[0]
    con.close()
    ref = search(old, "--item", first, "--target", tgt)
    assert ref["scan"] == "fp32"
    run("index", old, "--compress", "sq8", "--target", tgt, check=True)
    got = search(old, "--item", first, "--target", tgt)
    assert got["scan"] == "sq8"
    assert [h["id"] for h in got["results"]] == [h["id"] for h in ref["results"]]


def test_coco_subset_equals_the_fp32_scan(tmp_path, model, coco):
    db = tmp_path / "coco.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--images", coco / "images", "--captions", coco / "captions.jsonl", check=True)
    con = sqlite3.connect(db)
    caps = [r[0] for r in con.execute("SELECT id FROM vectors_text ORDER BY id LIMIT 60")]
    imgs = [r[0] for r in con.execute("SELECT id FROM vectors_image ORDER BY id LIMIT 60")]
    con.close()
    for kind in KINDS:
        run("index", db, "--compress", kind, check=True)  # both targets
        st = json.loads(run("stats", db, "--json", check=True).stdout)
        assert [(c["target"], c["kind"]) for c in st["compressed"]] == [("image", kind),
                                                                         ("text", kind)]
        for tgt, qs in (("image", caps), ("text", imgs)):
            qf = batch_file(tmp_path, [f"item:{i}" for i in qs])
            for metric in METRICS:
                a = ("--target", tgt, "--metric", metric, "-k", "10")
                got = search(db, "--batch", qf, *a)
                ref = search(db, "--batch", qf, *a, "--no-compressed")
                assert got["scan"] == kind
                assert agree(hits(got), hits(ref), 10) >= 0.999, (kind, tgt, metric)
                g1 = search(db, "--item", qs[0], *a)
                r1 = search(db, "--item", qs[0], *a, "--no-compressed")
                assert [h["id"] for h in g1["results"]] == [h["id"] for h in r1["results"]]


FLICKR_TEXTS = 6000
FLICKR_QUERIES = 60


def test_flickr8k_recall(tmp_path, model, shared):
    """Flickr8k captions (the first 6000) as the base, Flickr8k photos as the
    queries (image -> text), vectors of a generated model: recall@10 of every
    copy against the fp32 scan >= 0.999 (one query at a time and batched)."""
    fl = shared / "data" / "flickr8k"
    if not (fl / "images").is_dir():
        pytest.skip(f"{fl} not found; skipping")
    caps = []
    with open(fl / "captions.jsonl") as f:
        for line in f:
            caps += json.loads(line)["captions"]
            if len(caps) >= FLICKR_TEXTS:
                break
    texts = tmp_path / "caps.txt"
    texts.write_text("".join(c.replace("\n", " ") + "\n" for c in caps[:FLICKR_TEXTS]))
    db = tmp_path / "f.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--texts", texts, check=True)
    photos = sorted((fl / "images").iterdir())[-FLICKR_QUERIES:]
    qf = batch_file(tmp_path, [f"image:{p}" for p in photos])
    for kind in KINDS:
        run("index", db, "--compress", kind, "--target", "text", check=True)
        refs = {}
        for metric in METRICS:
            a = ("--target", "text", "--metric", metric, "-k", "10")
            refs[metric] = ref = hits(search(db, "--batch", qf, *a, "--no-compressed"))
            got = hits(search(db, "--batch", qf, *a))
            assert agree(got, ref, 10) >= 0.999, (kind, metric)
        one = [hits(search(db, "--image", p, "--target", "text", "-k", "10"))[0]
               for p in photos[:10]]
        assert agree(one, refs["cosine"][:10], 10) >= 0.999, kind


def test_named_vector_set(tmp_path, model):
    """A copy of a set made by reembed (--space), beside the base set's."""
    db = random_db(tmp_path / "s.db", model, 600, 3)
    m2 = tmp_path / "m2"
    subprocess.run([PY, str(GEN), str(m2), "--size", "tiny", "--keys", "openai", "--dtype", "F32",
                    "--seed", "2"], check=True, capture_output=True)
    run("reembed", db, "--model", m2, "--as", "other", check=True)
    run("index", db, "--compress", "sq8", "--space", "other", check=True)  # texts only here
    st = json.loads(run("stats", db, "--json", check=True).stdout)
    assert [(c["space"], c["target"], c["kind"]) for c in st["compressed"]] == [("other", "text",
                                                                                 "sq8")]
    for metric in METRICS:
        a = ("--item", "17", "--target", "text", "--metric", metric, "--space", "other")
        got, ref = search(db, *a), search(db, *a, "--no-compressed")
        assert got["scan"] == "sq8" and ref["scan"] == "fp32"
        assert [h["id"] for h in got["results"]] == [h["id"] for h in ref["results"]]
    assert search(db, "--item", "17", "--target", "text")["scan"] == "fp32"  # base has none
    run("index", db, "--drop", "--space", "other", check=True)
    assert search(db, "--item", "17", "--target", "text", "--space", "other")["scan"] == "fp32"
