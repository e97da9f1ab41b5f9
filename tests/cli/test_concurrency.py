"""Several processes on one database: random interleavings of add (images
with captions, the same folder twice, the same texts file three times), rm,
reembed (a second model's vector set), index (IVF of both sets, a Faiss
index of the texts) and search for a bounded time, then every invariant of
the file.

What must hold whatever the interleaving (issue 9): no orphan captions, no
duplicate standalone texts or image paths, one vector per item of each type,
every IVF index listing exactly the vectors of its set, every stored vector
findable by --item, every vector of a named set (set_vectors) belonging to
an item that exists, each item at most once per set and findable by
`search --space NAME --item ID`, and `clipdb check` clean; no process fails with a raw
SQLite error ("UNIQUE constraint") or a torn read ("vanished").
"""
import json
import random
import sqlite3
import subprocess
import time

import pytest
from PIL import Image

from conftest import BIN, gen_model, run

SECONDS = 20


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared):
    return gen_model(tmp_path_factory.mktemp("conc") / "tiny", seed=4)


@pytest.fixture(scope="module")
def model2(tmp_path_factory):
    """The second model (another seed) whose vectors `reembed` adds as a set."""
    return gen_model(tmp_path_factory.mktemp("conc2") / "tiny2", seed=11)


def invariants(db):
    # one read transaction: every query sees the same snapshot
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    con.execute("BEGIN")
    q = lambda sql: con.execute(sql).fetchall()
    assert q("SELECT id FROM items WHERE image IS NOT NULL AND image NOT IN "
             "(SELECT id FROM items WHERE type = 1)") == [], "orphan captions"
    assert q("SELECT text, count(*) FROM items WHERE type = 2 AND image IS NULL "
             "GROUP BY text HAVING count(*) > 1") == [], "duplicate standalone texts"
    assert q("SELECT abspath, count(*) FROM items WHERE type = 1 GROUP BY abspath "
             "HAVING count(*) > 1") == [], "duplicate image paths"
    assert q("SELECT count(*) FROM items WHERE type = 1") == q("SELECT count(*) FROM vectors_image")
    assert q("SELECT count(*) FROM items WHERE type = 2") == q("SELECT count(*) FROM vectors_text")
    assert q("SELECT id FROM vectors_image WHERE id NOT IN (SELECT id FROM items)") == []
    assert q("SELECT id FROM vectors_text WHERE id NOT IN (SELECT id FROM items)") == []
    for target, metric in q("SELECT target, metric FROM ivf"):
        table = "vectors_image" if target == 1 else "vectors_text"
        listed = q(f"SELECT id FROM ivf_assign WHERE target = {target} AND metric = {metric} "
                   f"ORDER BY id")
        assert listed == q(f"SELECT id FROM {table} ORDER BY id"), \
            f"IVF lists of set {target} differ from its vectors"
    if q("SELECT name FROM sqlite_master WHERE name = 'set_vectors'"):
        assert q("SELECT set_id, id FROM set_vectors WHERE id NOT IN (SELECT id FROM items)") \
            == [], "vectors of a named set whose item is gone"
        assert q("SELECT set_id, id, count(*) FROM set_vectors GROUP BY set_id, id "
                 "HAVING count(*) > 1") == [], "an item twice in a named set"
        assert q("SELECT v.id FROM set_vectors v JOIN items i ON i.id = v.id "
                 "WHERE v.type != i.type") == [], "a named set's vector of the wrong type"
    ids = [r[0] for r in q("SELECT id FROM items")]
    con.execute("COMMIT")
    con.close()
    return ids


def set_items(db, name):
    """{type: [item ids]} of the named vector set."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT v.type, v.id FROM set_vectors v JOIN vector_sets s "
                       "ON s.id = v.set_id WHERE s.name = ? ORDER BY v.id", (name,)).fetchall()
    con.close()
    out = {1: [], 2: []}
    for t, i in rows:
        out[t].append(i)
    return out


def assert_set_findable(tmp_path, db, name):
    """Every vector of set `name`, as an --item query in that space (one
    --batch per type), finds its own item with the top score."""
    by_type = set_items(db, name)
    assert by_type[1] or by_type[2], by_type
    for t, target in ((1, "image"), (2, "text")):
        if not by_type[t]:
            continue  # e.g. every reembed ran before the first images came
        batch = tmp_path / f"items-{target}.txt"
        batch.write_text("".join(f"item:{i}\n" for i in by_type[t]))
        r = run("search", db, "--batch", batch, "--space", name, "--target", target, "-k", "3",
                "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert len(out["queries"]) == len(by_type[t]), r.stdout[:500]
        for i, res in zip(by_type[t], out["queries"]):
            hits = res["results"]
            mine = [h for h in hits if h["id"] == i]
            assert mine and hits[0]["score"] - mine[0]["score"] < 1e-5, (name, i, hits)


def test_random_interleavings_keep_every_invariant(tmp_path, model, model2):
    rnd = random.Random(9)
    imgs = tmp_path / "im"
    imgs.mkdir()
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(24):
            Image.new("RGB", (20 + i, 18), (i * 10 % 256, 80, 200 - i)).save(imgs / f"p{i}.png")
            f.write(json.dumps({"image": f"p{i}.png", "captions": [f"photo {i}", f"view {i}"]}) + "\n")
    (tmp_path / "t.txt").write_text("".join(f"text number {i}\n" for i in range(150)))
    db = tmp_path / "c.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--texts", tmp_path / "t.txt", "-q", check=True)
    add_imgs = ["add", db, "--images", imgs, "--captions", tmp_path / "c.jsonl", "-q", "--batch", "4"]
    add_txt = ["add", db, "--texts", tmp_path / "t.txt", "-q"]
    index_ivf = ["index", db, "--ivf", "--nlist", "3"]
    index_faiss = ["index", db, "--faiss", "Flat", "--target", "text"]
    reembed = ["reembed", db, "--model", model2, "--as", "ft", "-q", "--batch", "8"]
    procs, failures = [], []
    n_index = n_reembed = 0
    t_end = time.time() + SECONDS
    while time.time() < t_end:
        ids = invariants(db)
        kind = rnd.choice(["add-images", "add-texts", "rm", "search", "search", "index",
                           "reembed"])
        if n_index == 0:
            kind = "index"  # at least one, from the start
        elif n_reembed == 0:
            kind = "reembed"  # and a reembed early
        if kind == "index":
            cmds = [rnd.choice([index_ivf, index_faiss])]
            if n_index == 0:
                cmds = [index_ivf, index_faiss]
            n_index += len(cmds)
        elif kind == "add-images":
            cmds = [add_imgs] * rnd.choice([1, 2])
        elif kind == "reembed":
            cmds = [reembed] * rnd.choice([1, 2])
            n_reembed += len(cmds)
        elif kind == "add-texts":
            cmds = [add_txt] * 3
        elif kind == "rm" and ids:
            cmds = [["rm", db, *map(str, rnd.sample(ids, min(len(ids), rnd.randint(1, 6))))]]
        else:
            cmds = [["search", db, "--text", "photo", "-k", "5"],
                    ["search", db, "--text", "text number", "--target", "text", "-k", "50"]]
        procs += [(c, subprocess.Popen([BIN, *map(str, c)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)) for c in cmds]
        time.sleep(rnd.uniform(0.0, 0.3))
        still = []
        for c, p in procs:
            if p.poll() is None:
                still.append((c, p))
                continue
            err = p.stderr.read()
            # a lost race may fail (rm of an id another rm took), but clearly
            if "UNIQUE constraint" in err or "vanished" in err or p.returncode not in (0, 1) or \
                    (p.returncode == 1 and "no item with id" not in err):
                failures.append((c, p.returncode, err))
        procs = still
    for c, p in procs:
        p.wait(timeout=120)
        err = p.stderr.read()
        if p.returncode != 0 and not (p.returncode == 1 and "no item with id" in err):
            failures.append((c, p.returncode, err))
    assert failures == [], failures[:5]
    ids = invariants(db)
    stats = json.loads(run("stats", db, "--json", check=True).stdout)
    assert stats["images"] + stats["texts"] == len(ids)
    assert {x["kind"] for x in stats["indexes"]} == {"ivf", "faiss"}, stats["indexes"]
    chk = run("check", db, "--json")
    assert chk.returncode == 0, chk.stdout[-3000:] + chk.stderr
    assert json.loads(chk.stdout)["ok"]
    for i in rnd.sample(ids, min(10, len(ids))):
        r = run("search", db, "--item", i, "--target", "text", "-k", "1", "--json")
        assert r.returncode == 0, r.stderr
    assert n_reembed > 0
    assert_set_findable(tmp_path, db, "ft")


def test_database_deleted_during_add_fails_clearly(tmp_path, model):
    imgs = tmp_path / "im"
    imgs.mkdir()
    for i in range(300):
        Image.new("RGB", (40, 30 + i % 50), (i % 256, (i * 7) % 256, 9)).save(imgs / f"q{i:03d}.png")
    db = tmp_path / "gone.db"
    run("init", db, "--model", model, check=True)
    p = subprocess.Popen([BIN, "add", str(db), "--images", str(imgs), "--batch", "1", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_end = time.time() + 60
    while time.time() < t_end:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            n = con.execute("SELECT count(*) FROM items").fetchone()[0]
            con.close()
        except sqlite3.Error:
            n = 0
        if n >= 2:
            break
        time.sleep(0.02)
    db.unlink()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, (p.returncode, out, err)
    assert "the database file was deleted or replaced" in err, err


def test_index_builds_racing_writers_list_every_vector(tmp_path, model):
    """`clipdb index` reads the vectors, trains, then stores its lists: a
    writer that commits in between must not leave vectors out of the lists
    (or deleted ones in them). Index builds run back to back while two
    processes add texts, one commit each; afterwards the lists equal the
    vector sets."""
    db = tmp_path / "r.db"
    run("init", db, "--model", model, check=True)
    (tmp_path / "base.txt").write_text("".join(f"base text {i}\n" for i in range(300)))
    run("add", db, "--texts", tmp_path / "base.txt", "-q", check=True)
    writers = []
    for w in range(2):
        f = tmp_path / f"w{w}.txt"
        f.write_text("".join(f"writer {w} text {i}\n" for i in range(400)))
        writers.append(subprocess.Popen([BIN, "add", str(db), "--texts", str(f), "-q",
                                         "--batch", "1"], stderr=subprocess.PIPE, text=True))
    failures = []
    t_end = time.time() + SECONDS
    n = 0
    # while the writers run (at least two builds, however fast they were)
    while n < 2 or (time.time() < t_end and any(p.poll() is None for p in writers)):
        spec = ["--ivf", "--target", "text", "--nlist", "4"] if n % 2 == 0 else \
            ["--faiss", "Flat", "--target", "text"]
        p = run("index", db, *spec)
        if p.returncode != 0:
            failures.append(p.stderr)
        n += 1
    for p in writers:
        p.wait(timeout=300)
        assert p.returncode == 0, p.stderr.read()
    assert failures == [] and n >= 2, (n, failures[:3])
    invariants(db)
    chk = run("check", db, "--json")
    assert chk.returncode == 0, chk.stdout[-3000:]


def test_concurrent_caption_adds_store_each_caption_once(tmp_path, model):
    """Captions added to images already stored, by several processes at once:
    each caption is checked again under the write lock, so none is stored
    twice (before, two `add --captions` of one file duplicated them)."""
    imgs = tmp_path / "im"
    imgs.mkdir()
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(40):
            Image.new("RGB", (24, 20 + i), (i * 6 % 256, 40, 100)).save(imgs / f"q{i}.png")
            f.write(json.dumps({"image": f"q{i}.png", "captions": [f"a photo {i}", f"a view {i}"]}) + "\n")
    db = tmp_path / "c.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--images", imgs, "-q", check=True)  # the images, no captions yet
    args = [str(BIN), "add", str(db), "--images", str(imgs), "--captions", str(tmp_path / "c.jsonl"),
            "-q", "--batch", "2"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    dups = con.execute("SELECT image, text, count(*) FROM items WHERE image IS NOT NULL "
                       "GROUP BY image, text HAVING count(*) > 1").fetchall()
    n = con.execute("SELECT count(*) FROM items WHERE image IS NOT NULL").fetchone()[0]
    con.close()
    assert dups == [] and n == 80, (dups[:5], n)
    assert run("check", db).returncode == 0
