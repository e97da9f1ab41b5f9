"""Black-box tests of the database commands (init, add, rm, search, index,
stats) through the real binary, on ../shared/data/coco-subset with a small
generated model. Exact search is checked against a brute-force numpy answer
over vectors from `clipdb embed`."""
import json
import os
import pathlib
import random
import shutil
import signal
import sqlite3
import subprocess
import time

import numpy as np
import pytest

from conftest import BIN, ROOT, run

GEN = ROOT / "tools" / "gen_model.py"
PY = "/usr/bin/python3"


def gen_model(d, seed):
    subprocess.run([PY, str(GEN), str(d), "--size", "tiny", "--keys", "openai", "--dtype", "F32",
                    "--seed", str(seed)], check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("model"), 1)


@pytest.fixture(scope="module")
def db(tmp_path_factory, model, coco):
    p = tmp_path_factory.mktemp("db") / "coco.db"
    run("init", p, "--model", model, check=True)
    r = run("add", p, "--images", coco / "images", "--captions", coco / "captions.jsonl", "--json",
            check=True)
    s = json.loads(r.stdout)
    assert s["images_added"] == 338 and s["captions_added"] == 1690 and s["images_failed"] == 0
    return p


def embed(model, texts=(), images=()):
    args = ["embed", "--model", model, "--json", "--truncate"]
    for t in texts:
        args += ["--text", t]
    for i in images:
        args += ["--image", i]
    r = run(*args, check=True)
    return np.array([json.loads(l)["embedding"] for l in r.stdout.splitlines()], dtype=np.float64)


def stored(db, table):
    con = sqlite3.connect(db)
    rows = con.execute(f"SELECT id, vec FROM {table} ORDER BY id").fetchall()
    con.close()
    ids = np.array([r[0] for r in rows])
    return ids, np.array([np.frombuffer(r[1], dtype="<f4") for r in rows], dtype=np.float64)


def items(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT id, type, path, text, image FROM items ORDER BY id").fetchall()
    con.close()
    return rows


def scores(q, base, metric):
    if metric == "dot":
        return base @ q
    if metric == "cosine":
        return (base @ q) / (np.linalg.norm(base, axis=1) * np.linalg.norm(q))
    return -np.linalg.norm(base - q, axis=1)


def search(db, *args):
    r = run("search", db, *args, "--json", check=True)
    return json.loads(r.stdout)


def test_stats_and_stored_vectors_match_embed(db, model, coco):
    s = json.loads(run("stats", db, "--json", check=True).stdout)
    assert s["images"] == 338 and s["texts"] == 1690 and s["captions"] == 1690
    assert s["model"].startswith("clip-") and s["indexes"] == []
    rows = items(db)
    imgs = [r for r in rows if r[1] == 1][:6]
    caps = [r for r in rows if r[1] == 2][:6]
    ids, vecs = stored(db, "vectors_image")
    want = embed(model, images=[r[2] for r in imgs])
    got = vecs[[list(ids).index(r[0]) for r in imgs]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ids, vecs = stored(db, "vectors_text")
    want = embed(model, texts=[r[3] for r in caps])
    got = vecs[[list(ids).index(r[0]) for r in caps]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("direction", ["text->image", "image->text", "image->image", "text->text"])
def test_exact_search_equals_brute_force(db, model, coco, metric, direction):
    src, dst = direction.split("->")
    rows = items(db)
    if src == "text":
        query = "two dogs playing in the snow"
        q = embed(model, texts=[query])[0]
        qargs = ["--text", query]
    else:
        path = coco / "images" / "000000000139.jpg"
        q = embed(model, images=[path])[0]
        qargs = ["--image", path]
    ids, base = stored(db, "vectors_image" if dst == "image" else "vectors_text")
    s = scores(q, base, metric)
    order = np.lexsort((ids, -s))[:10]
    res = search(db, *qargs, "--target", dst, "--metric", metric, "-k", "10")["results"]
    assert len(res) == 10
    assert all(r["type"] == dst for r in res)
    got = np.array([r["score"] for r in res])
    if metric == "l2":
        # the kernel expands ||q-b||^2 = ||q||^2 + ||b||^2 - 2 q.b in float32: compare squared
        # distances, with cancellation error relative to ||q||^2 (distance 0 reads ~1e-3)
        np.testing.assert_allclose(got ** 2, s[order] ** 2, rtol=2e-4, atol=1e-5 * (q @ q))
    else:
        np.testing.assert_allclose(got, s[order], rtol=2e-4, atol=2e-5)
    # ids equal up to near-ties
    for r, i in zip(res, order):
        if r["id"] != ids[i]:
            assert abs(s[list(ids).index(r["id"])] - s[i]) < 1e-4
    assert got.tolist() == sorted(got.tolist(), reverse=True)
    if dst == "image":
        assert all(r["path"] and "image_id" in r and "split" in r for r in res)
    else:
        assert all(r["text"] and r["image"] > 0 for r in res)


def test_item_query_and_batch_match_single_queries(db, tmp_path):
    one = search(db, "--item", "1", "--target", "image", "-k", "5")["results"]
    assert one[0]["id"] == 1 and abs(one[0]["score"] - 1) < 1e-5
    b = tmp_path / "q.txt"
    b.write_text("a dog\nitem:1\n\na red bus\n")
    out = search(db, "--batch", b, "-k", "5")
    assert len(out["queries"]) == 3
    assert [r["id"] for r in out["queries"][1]["results"]] == [r["id"] for r in one]
    single = search(db, "--text", "a red bus", "-k", "5")["results"]
    assert [r["id"] for r in out["queries"][2]["results"]] == [r["id"] for r in single]
    assert "took_ms" in out


def test_where_filters_return_k(db):
    res = search(db, "--text", "a cat", "--where", "split=train2017", "-k", "25")["results"]
    assert len(res) == 25 and all(r["split"] == "train2017" for r in res)
    res = search(db, "--text", "a cat", "--target", "text", "--where", "split=val2017",
                 "--where", "image_id=139", "-k", "10")["results"]
    assert len(res) == 5 and all(r["image_id"] == 139 for r in res)  # 5 captions exist
    res = search(db, "--text", "a cat", "--where", "split=nope")["results"]
    assert res == []
    res = search(db, "--text", "a cat", "--where", "split=val2017", "--index", "exact",
                 "-k", "300")["results"]
    assert len(res) == 208


def test_ivf_recall_and_maintenance(tmp_path, db, coco):
    p = tmp_path / "ivf.db"
    shutil.copy(db, p)
    r = run("search", p, "--text", "x", "--index", "ivf")
    assert r.returncode == 1 and "clipdb index" in r.stderr
    for target in ("image", "text"):
        run("index", p, "--ivf", "--nlist", "16", "--target", target, check=True)
    s = json.loads(run("stats", p, "--json", check=True).stdout)
    assert {(i["target"], i["nlist"], i["vectors"]) for i in s["indexes"]} == \
        {("image", 16, 338), ("text", 16, 1690)}
    queries = ["a dog", "a plate of food", "a man riding a wave", "a train", "people at a table",
               "a cat on a bed", "a city street", "a kitchen", "a baseball game", "a clock tower"]
    hits = total = 0
    for q in queries:
        for target in ("image", "text"):
            ex = search(p, "--text", q, "--target", target, "-k", "10")["results"]
            iv = search(p, "--text", q, "--target", target, "-k", "10", "--index", "ivf",
                        "--nprobe", "4")["results"]
            assert len(iv) == 10
            hits += len({r["id"] for r in ex} & {r["id"] for r in iv})
            total += 10
            full = search(p, "--text", q, "--target", target, "-k", "10", "--index", "ivf",
                          "--nprobe", "16")["results"]
            assert [r["id"] for r in full] == [r["id"] for r in ex]
    recall = hits / total
    print(f"IVF recall@10 (nlist 16, nprobe 4, tiny model, coco-subset): {recall:.3f}")
    assert recall >= 0.5
    # filtered IVF still gives k results
    res = search(p, "--text", "a dog", "--index", "ivf", "--nprobe", "1", "--where",
                 "split=val2017", "-k", "20")["results"]
    assert len(res) == 20 and all(r["split"] == "val2017" for r in res)
    # deletes leave the lists; adds go into the nearest list
    top = search(p, "--text", "a dog", "--index", "ivf", "--nprobe", "16")["results"][0]["id"]
    run("rm", p, top, check=True)
    s = json.loads(run("stats", p, "--json", check=True).stdout)
    assert {(i["target"], i["vectors"]) for i in s["indexes"]} == {("image", 337), ("text", 1685)}
    res = search(p, "--text", "a dog", "--index", "ivf", "--nprobe", "16")["results"]
    assert top not in [r["id"] for r in res]
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(coco / "images" / "000000000139.jpg", extra / "copy.jpg")
    run("add", p, "--images", extra, check=True)
    s = json.loads(run("stats", p, "--json", check=True).stdout)
    assert {(i["target"], i["vectors"]) for i in s["indexes"]} == {("image", 338), ("text", 1685)}
    res = search(p, "--image", extra / "copy.jpg", "--index", "ivf", "--nprobe", "1", "-k", "2")
    assert res["results"][0]["path"].endswith("copy.jpg") or \
        res["results"][1]["path"].endswith("copy.jpg")


def test_faiss_index(db):
    ex = search(db, "--text", "a dog", "-k", "10")["results"]
    fa = search(db, "--text", "a dog", "-k", "10", "--index", "faiss", "--faiss", "Flat")["results"]
    assert [r["id"] for r in fa] == [r["id"] for r in ex]
    np.testing.assert_allclose([r["score"] for r in fa], [r["score"] for r in ex], rtol=1e-4)
    fa = search(db, "--text", "a dog", "-k", "10", "--faiss", "IVF8,Flat", "--nprobe", "8")
    assert len(fa["results"]) == 10
    r = run("search", db, "--text", "a", "--faiss", "NoSuchIndex")
    assert r.returncode == 1 and "Faiss factory string 'NoSuchIndex' not accepted" in r.stderr


def test_stored_faiss_index(tmp_path, db, coco):
    p = tmp_path / "faiss.db"
    shutil.copy(db, p)
    r = run("search", p, "--text", "a dog", "--index", "faiss")
    assert r.returncode == 1 and "clipdb index" in r.stderr and "--faiss" in r.stderr
    r = run("index", p, "--faiss", "IVF8,Flat", check=True)
    assert 'Faiss "IVF8,Flat"' in r.stdout
    run("index", p, "--faiss", "Flat", "--target", "text", "--metric", "l2", check=True)
    s = json.loads(run("stats", p, "--json", check=True).stdout)
    assert sorted((i["kind"], i["factory"], i["target"], i["metric"], i["vectors"])
                  for i in s["indexes"]) == [("faiss", "Flat", "text", "l2", 1690),
                                             ("faiss", "IVF8,Flat", "image", "cosine", 338)]
    # the stored index answers as one built in memory from the same string
    for q in ("a dog", "a kitchen", "a train"):
        st = search(p, "--text", q, "--index", "faiss", "--nprobe", "2", "-k", "10")["results"]
        mem = search(p, "--text", q, "--faiss", "IVF8,Flat", "--nprobe", "2", "-k", "10")["results"]
        assert [r["id"] for r in st] == [r["id"] for r in mem]
        np.testing.assert_allclose([r["score"] for r in st], [r["score"] for r in mem], rtol=1e-5)
        st = search(p, "--text", q, "--index", "faiss", "--target", "text", "--metric", "l2")
        ex = search(p, "--text", q, "--target", "text", "--metric", "l2")
        assert [r["id"] for r in st["results"]] == [r["id"] for r in ex["results"]]
    # deletes and adds after the build are reflected (all 8 lists: exact)
    top = search(p, "--text", "a dog", "--index", "faiss", "--nprobe", "8")["results"][0]["id"]
    run("rm", p, top, check=True)
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(coco / "images" / "000000000139.jpg", extra / "copy.jpg")
    run("add", p, "--images", extra, check=True)
    for q in ("a dog", "a kitchen"):
        st = search(p, "--text", q, "--index", "faiss", "--nprobe", "8", "-k", "20")["results"]
        ex = search(p, "--text", q, "-k", "20")["results"]
        assert [r["id"] for r in st] == [r["id"] for r in ex] and top not in [r["id"] for r in st]
    res = search(p, "--image", extra / "copy.jpg", "--index", "faiss", "--nprobe", "8", "-k", "2")
    assert any(r["path"].endswith("copy.jpg") for r in res["results"])
    # an index type that cannot remove is rebuilt for the search, with a note
    run("index", p, "--faiss", "HNSW8", check=True)
    run("rm", p, res["results"][0]["id"], check=True)
    r = run("search", p, "--text", "a dog", "--index", "faiss", "--json", check=True)
    assert "note:" in r.stderr and "rebuilt" in r.stderr
    assert len(json.loads(r.stdout)["results"]) == 10
    # a corrupted blob is refused before Faiss reads it
    con = sqlite3.connect(p)
    blob = bytearray(con.execute("SELECT blob FROM faiss WHERE target = 2").fetchone()[0])
    blob[len(blob) // 2] ^= 0x40
    con.execute("UPDATE faiss SET blob = ? WHERE target = 2", (bytes(blob),))
    con.commit()
    con.close()
    r = run("search", p, "--text", "a dog", "--index", "faiss", "--target", "text", "--metric", "l2")
    assert r.returncode == 1 and "corrupt" in r.stderr and "SHA-256" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def small_folder(coco, dst, n):
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(coco / "images"))[:n]
    for i, nm in enumerate(names):
        sub = dst / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        shutil.copy(coco / "images" / nm, sub / nm.replace(".jpg", ".JPG" if i % 3 == 0 else ".jpg"))
    caps = dst / "captions.jsonl"
    with open(coco / "captions.jsonl") as f, open(caps, "w") as g:
        for line in f:
            o = json.loads(line)
            if o["image"] in names:
                i = names.index(o["image"])
                o["image"] = ("sub/" if i % 2 else "") + \
                    o["image"].replace(".jpg", ".JPG" if i % 3 == 0 else ".jpg")
                g.write(json.dumps(o) + "\n")
    return dst, caps


def test_incremental_add_changed_files_rm_and_reopen(tmp_path, model, coco):
    folder, caps = small_folder(coco, tmp_path / "imgs", 8)
    p = tmp_path / "inc.db"
    run("init", p, "--model", model, check=True)
    s = json.loads(run("add", p, "--images", folder, "--captions", caps, "--json", check=True).stdout)
    assert (s["images_added"], s["captions_added"], s["images_unchanged"]) == (8, 40, 0)
    r = run("add", p, "--images", folder, "--captions", caps, check=True)
    assert "0 added" in r.stdout and "8 unchanged (skipped)" in r.stdout
    # one changed file, one new file
    names = sorted(os.listdir(coco / "images"))
    target = next(folder.rglob("*.jpg"))
    shutil.copy(coco / "images" / names[20], target)
    shutil.copy(coco / "images" / names[21], folder / "new.png")  # a JPEG named .png
    s = json.loads(run("add", p, "--images", folder, "--captions", caps, "--json", check=True).stdout)
    assert (s["images_added"], s["images_updated"], s["images_unchanged"], s["captions_added"]) == \
        (1, 1, 7, 0)
    st = json.loads(run("stats", p, "--json", check=True).stdout)
    assert (st["images"], st["texts"]) == (9, 40)
    # the changed file's vector follows its new content
    res = search(p, "--image", coco / "images" / names[20], "-k", "1")["results"]
    assert pathlib.Path(res[0]["abspath"]) == target.resolve() and res[0]["score"] > 0.9999
    # rm an image: its captions go too
    img = [r for r in items(p) if r[1] == 1 and r[4] is None][0][0]
    r = run("rm", p, img, check=True)
    assert "deleted 1 item and 5 captions of deleted images" in r.stdout
    r = run("rm", p, 99999)
    assert r.returncode == 1 and "no item with id 99999" in r.stderr
    st = json.loads(run("stats", p, "--json", check=True).stdout)
    assert (st["images"], st["texts"]) == (8, 35)
    # texts: added once, skipped the second time
    t = tmp_path / "t.txt"
    t.write_text("a dog\r\na cat\n\na dog\n")
    r = run("add", p, "--texts", t, check=True)
    assert "2 added" in r.stdout
    r = run("add", p, "--texts", t, check=True)
    assert "0 added, 3 already present" in r.stdout
    res = search(p, "--text", "a cat", "--target", "text", "-k", "1")["results"]
    assert res[0]["text"] == "a cat" and "image" not in res[0]


def test_texts_bad_lines_are_skipped(tmp_path, model):
    p = tmp_path / "texts.db"
    run("init", p, "--model", model, check=True)
    t = tmp_path / "t.txt"
    t.write_bytes(b"a red bus\n"
                  b"broken \xff\xfe utf-8\n"        # line 2: invalid UTF-8
                  b"   \t \n"                       # line 3: empty after cleaning
                  b"a green tree\n"
                  b"\n"                              # blank: ignored, not an error
                  b"bad\x00byte\n"                   # line 6: a NUL byte
                  b"a red bus\n")                    # already in this file: skipped
    r = run("add", p, "--texts", t, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["texts_added"], s["texts_unchanged"], s["texts_failed"]) == (2, 1, 3)
    for n in (2, 3, 6):
        assert f"t.txt:{n}:" in r.stderr, r.stderr
    assert "t.txt:1:" not in r.stderr and "t.txt:4:" not in r.stderr
    texts = sorted(x[3] for x in items(p))
    assert texts == ["a green tree", "a red bus"]
    r = run("add", p, "--texts", t, check=True)
    assert "0 added, 3 already present (skipped), 3 failed" in r.stdout
    assert json.loads(run("stats", p, "--json").stdout)["texts"] == 2


def test_bad_inputs(tmp_path, model, coco):
    folder, caps = small_folder(coco, tmp_path / "imgs", 3)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    p = tmp_path / "bad.db"
    run("init", p, "--model", model, check=True)
    # malformed captions line: nothing is added, the line is named
    badcaps = tmp_path / "bad.jsonl"
    lines = caps.read_text().splitlines()
    badcaps.write_text(lines[0] + "\n" + '{"image": "x.jpg", "captions": ["a"' + "\n")
    r = run("add", p, "--images", folder, "--captions", badcaps)
    assert r.returncode == 1 and "bad.jsonl:2:" in r.stderr
    assert json.loads(run("stats", p, "--json").stdout)["images"] == 0
    # corrupt images: reported with path and reason, skipped, counted
    r = run("add", p, "--images", folder, "--captions", caps, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["images_added"] == 3 and s["images_failed"] == 2
    assert "corrupt.jpg" in r.stderr and "empty.png" in r.stderr
    # wrong model
    other = gen_model(tmp_path / "other", 2)
    r = run("add", p, "--images", folder, "--model", other)
    assert r.returncode == 1 and "not the model this database was created with" in r.stderr
    # not a database
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    for cmd in (["stats", junk], ["search", junk, "--text", "a"], ["add", junk, "--texts", junk]):
        r = run(*cmd)
        assert r.returncode == 1 and "not a clipdb database" in r.stderr, r.stderr
    # another SQLite file
    other_db = tmp_path / "other.db"
    con = sqlite3.connect(other_db)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    r = run("stats", other_db)
    assert r.returncode == 1 and "not a clipdb database" in r.stderr
    # a newer format version
    newer = tmp_path / "newer.db"
    shutil.copy(p, newer)
    con = sqlite3.connect(newer)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    r = run("stats", newer)
    assert r.returncode == 1 and "newer than this clipdb supports" in r.stderr
    # missing database, existing one on init, usage errors
    r = run("stats", tmp_path / "none.db")
    assert r.returncode == 1 and "no such database" in r.stderr
    r = run("init", p, "--model", model)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert run("search", p).returncode == 2
    assert run("search", p, "--text", "a", "--metric", "manhattan").returncode == 2
    assert run("add", p).returncode == 2
    assert run("rm", p, "abc").returncode == 2
    assert run("index", p).returncode == 2


def test_repeated_captions_are_counted(tmp_path, model, coco):
    # Flickr8k repeats a caption on the same image 10 times: one copy is kept,
    # and the summary accounts for every entry.
    folder, caps = small_folder(coco, tmp_path / "imgs", 3)
    entries = [json.loads(l) for l in caps.read_text().splitlines()]
    entries[0]["captions"].append(entries[0]["captions"][1])
    caps.write_text("".join(json.dumps(e) + "\n" for e in entries))
    p = tmp_path / "r.db"
    run("init", p, "--model", model, check=True)
    r = run("add", p, "--images", folder, "--captions", caps, check=True)
    assert "15 added, 1 skipped as repeats of a caption of the same image" in r.stdout, r.stdout
    s = json.loads(run("add", p, "--images", folder, "--captions", caps, "--json",
                       check=True).stdout)
    assert s["images_unchanged"] == 3 and s["captions_added"] == 0


@pytest.mark.parametrize("fmt", ["coco", "csv"])
def test_other_captions_formats(tmp_path, model, coco, fmt):
    folder, caps = small_folder(coco, tmp_path / "imgs", 4)
    entries = [json.loads(l) for l in caps.read_text().splitlines()]
    if fmt == "coco":
        f = tmp_path / "captions_val2017.json"
        f.write_text(json.dumps({
            "images": [{"id": e["image_id"], "file_name": e["image"]} for e in entries],
            "annotations": [{"image_id": e["image_id"], "caption": c} for e in entries
                            for c in e["captions"]]}))
    else:
        f = tmp_path / "caps.csv"
        import csv
        with open(f, "w", newline="") as g:
            w = csv.writer(g)
            w.writerow(["image", "caption", "split"])
            for e in entries:
                for c in e["captions"]:
                    w.writerow([e["image"], c + ', "quoted"', e["split"]])
    p = tmp_path / "f.db"
    run("init", p, "--model", model, check=True)
    s = json.loads(run("add", p, "--images", folder, "--captions", f, "--json", check=True).stdout)
    assert s["captions_added"] == 20 and s["captions_unmatched"] == 0
    res = search(p, "--text", "x", "--target", "text", "-k", "1")["results"]
    if fmt == "coco":
        assert "image_id" in res[0]
    else:
        assert res[0]["text"].endswith(', "quoted"') and "split" in res[0]


def test_kill_and_resume(tmp_path, model, coco):
    """SIGKILL `clipdb add` over the whole coco-subset (338 images) at random
    moments after its progress output shows a partial count; after every
    kill the database opens and is consistent; then the same command
    resumes. At least half of the kills must land while images were still
    missing (checked by counting after the kill)."""
    import re
    total_imgs = len([f for f in os.listdir(coco / "images") if f.endswith(".jpg")])
    p = tmp_path / "kill.db"
    run("init", p, "--model", model, check=True)
    rng = random.Random(7)
    args = [BIN, "add", str(p), "--images", str(coco / "images"), "--captions",
            str(coco / "captions.jsonl"), "--batch", "4", "--progress-every", "0.05"]
    prog = re.compile(r"images: (\d+)/(\d+)")
    kills = mid = 0
    t0 = time.monotonic()
    for i in range(8):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # plain progress lines (stderr is not a terminal): wait for a partial count
        while True:
            line = proc.stderr.readline()
            if not line:
                break
            m = prog.search(line)
            if m and 0 < int(m.group(1)) < int(m.group(2)):
                time.sleep(rng.uniform(0.0, 0.15))
                break
        proc.send_signal(signal.SIGKILL)
        proc.stderr.close()
        proc.wait()
        kills += 1
        st = json.loads(run("stats", p, "--json", check=True).stdout)
        # every committed image has its vector and all its captions
        con = sqlite3.connect(p)
        n_img, n_vec = con.execute(
            "SELECT (SELECT count(*) FROM items WHERE type=1), (SELECT count(*) FROM vectors_image)"
        ).fetchone()
        bad = con.execute("SELECT count(*) FROM items i WHERE type=1 AND "
                          "(SELECT count(*) FROM items c WHERE c.image=i.id) != 5").fetchone()[0]
        con.close()
        assert n_img == n_vec == st["images"] and bad == 0
        mid += n_img < total_imgs
        if n_img == total_imgs:
            break
    print(f"kill-and-resume: {mid} of {kills} kills landed mid-ingest "
          f"({time.monotonic() - t0:.1f} s)")
    assert mid * 2 >= kills and mid >= 3
    s = json.loads(run("add", p, "--images", coco / "images", "--captions",
                       coco / "captions.jsonl", "--json", check=True).stdout)
    assert s["images_added"] + s["images_unchanged"] == total_imgs
    st = json.loads(run("stats", p, "--json", check=True).stdout)
    assert (st["images"], st["texts"], st["vectors"]) == (total_imgs, 5 * total_imgs,
                                                          6 * total_imgs)


def test_help_teaches():
    for cmd in ("init", "add", "rm", "search", "index", "stats"):
        r = run(cmd, "--help", check=True)
        assert r.stdout.startswith("usage: clipdb " + cmd) and "example" in r.stdout


FIXTURE_V1 = ROOT / "tests" / "fixtures" / "v1-tiny-seed1.db"


def test_v1_fixture_opens_and_searches(tmp_path, model):
    """A format-1 database written by clipdb 0.1.0 (see tests/fixtures/README.md)
    opens with today's binary: stats, and searches equal a brute-force answer."""
    p = tmp_path / "v1.db"
    shutil.copy(FIXTURE_V1, p)
    info = json.loads(run("model", "info", model, "--json", check=True).stdout)
    st = json.loads(run("stats", p, "--json", check=True).stdout)
    if st["model"] != info["identity"]:
        pytest.fail(f"tools/gen_model.py --size tiny --seed 1 now writes a model with identity "
                    f"{info['identity']}, but the v1 fixture was made with {st['model']}: "
                    f"gen_model's output changed, so the fixture's vectors cannot be checked "
                    f"against today's encoder (regenerate the fixture as tests/fixtures/README.md "
                    f"says, or restore gen_model)")
    assert (st["images"], st["texts"], st["captions"], st["vectors"], st["dim"]) == (4, 20, 20, 24, 32)
    assert st["format_version"] == 1
    rows = items(p)
    assert sorted(r[2] for r in rows if r[1] == 1) == [
        "images/000000000139.jpg", "images/000000000790.jpg", "images/000000000802.jpg",
        "images/000000005802.jpg"]
    for target, table in (("image", "vectors_image"), ("text", "vectors_text")):
        ids, vecs = stored(p, table)
        q = embed(model, texts=["a white refrigerator in a kitchen"])[0]
        want = ids[np.argsort(-scores(q, vecs, "cosine"), kind="stable")][:3]
        got = search(p, "--text", "a white refrigerator in a kitchen", "--target", target,
                     "-k", "3", "--model", model)["results"]
        assert [r["id"] for r in got] == list(want)
    # the stored caption vectors are what today's encoder makes of the captions
    caps = [r for r in rows if r[1] == 2][:3]
    ids, vecs = stored(p, "vectors_text")
    np.testing.assert_allclose(vecs[[list(ids).index(r[0]) for r in caps]],
                               embed(model, texts=[r[3] for r in caps]), rtol=1e-4, atol=1e-5)
    res = search(p, "--item", caps[0][0], "--target", "text", "-k", "1", "--model", model)
    assert res["results"][0]["id"] == caps[0][0] and res["results"][0]["split"] in ("val2017", "train2017")
    # read-only opens leave the file as it is (no table made); the first
    # read-write open upgrades it: each index type adds the tables it lacks
    assert json.loads(run("stats", p, "--json", check=True).stdout)["format_version"] == 1
    assert schema(p) == schema(FIXTURE_V1)
    assert not {"faiss", "faiss_ids"} & set(schema(p))
    t = tmp_path / "t.txt"
    t.write_text("a brand new caption\n")
    run("add", p, "--texts", t, "--model", model, check=True)
    up = schema(p)
    assert {k: v for k, v in up.items() if k in schema(FIXTURE_V1)} == schema(FIXTURE_V1)
    assert set(up) - set(schema(FIXTURE_V1)) == {"faiss", "faiss_ids", "faiss_ids_id"}
    run("index", p, "--faiss", "Flat", check=True)
    st = json.loads(run("stats", p, "--json", check=True).stdout)
    assert (st["format_version"], st["texts"], len(st["indexes"])) == (2, 21, 1)
    # a new file has the same index tables as an upgraded one, made by the same types
    n = tmp_path / "new.db"
    run("init", n, "--model", model, check=True)
    fresh = schema(n)
    for name in ("ivf", "ivf_assign", "ivf_assign_id", "faiss", "faiss_ids", "faiss_ids_id"):
        assert fresh[name] == up[name], name


def schema(p):
    """{name: CREATE statement} of the tables and indexes of database p (read-only)."""
    con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        return {n: sql for n, sql in con.execute(
            "SELECT name, sql FROM sqlite_schema WHERE sql IS NOT NULL")}
    finally:
        con.close()
