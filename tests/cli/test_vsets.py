"""Vector sets (issue 6, "One database, several models"): clipdb reembed adds
the vectors of a second model over the same items; search --space, stats,
eval --set and rm see them. Checked against `clipdb embed` of that model
(an independent path: no database), sqlite3 reads of the file, and a clean
reembed after a SIGKILL. The second model is generated with another seed AND
another size (64-dimensional vectors beside the base's 32)."""
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time

import numpy as np
import pytest

from conftest import BIN, ROOT, gen_model, one_line_failure, run

FIXTURE_V1 = ROOT / "tests" / "fixtures" / "v1-tiny-seed1.db"


@pytest.fixture(scope="module")
def m1(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("m1") / "model", "tiny", "openai", "F32", 1)


@pytest.fixture(scope="module")
def m2(tmp_path_factory):
    """The second model: another seed and size (64 dims)."""
    return gen_model(tmp_path_factory.mktemp("m2") / "model", "small", "openai", "F32", 2)


def subset(coco, dest, first, n):
    """Images first..first+n of coco-subset's captions file, with their captions."""
    (dest / "images").mkdir(parents=True)
    lines = (coco / "captions.jsonl").read_text().splitlines()[first:first + n]
    for l in lines:
        shutil.copy(coco / "images" / json.loads(l)["image"], dest / "images")
    (dest / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def make_db(path, model, data):
    run("init", path, "--model", model, check=True)
    run("add", path, "--images", data / "images", "--captions", data / "captions.jsonl", "-q",
        check=True)
    return path


def stats(db):
    return json.loads(run("stats", db, "--json", check=True).stdout)


def sets(db):
    return {s["name"]: s for s in stats(db)["sets"]}


def reembed(db, model, name, *extra, check=True):
    r = run("reembed", db, "--model", model, "--as", name, "--json", "-q", *extra, check=check)
    return json.loads(r.stdout) if check else r


def search(db, *args):
    return json.loads(run("search", db, "--json", *args, check=True).stdout)["results"]


def embed(model, texts=(), images=()):
    args = ["embed", "--model", model, "--json", "--truncate"]
    for t in texts:
        args += ["--text", t]
    for i in images:
        args += ["--image", i]
    r = run(*args, check=True)
    return np.array([json.loads(l)["embedding"] for l in r.stdout.splitlines()], dtype=np.float64)


def set_rows(db, name):
    """{(type, id): vector} of named set `name`, read with sqlite3."""
    con = sqlite3.connect(db)
    rows = con.execute("SELECT v.type, v.id, v.vec FROM set_vectors v JOIN vector_sets s "
                       "ON s.id = v.set_id WHERE s.name = ?", (name,)).fetchall()
    con.close()
    return {(t, i): np.frombuffer(v, dtype="<f4").astype(np.float64) for t, i, v in rows}


def items(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT id, type, abspath, text FROM items ORDER BY id").fetchall()
    con.close()
    return rows


@pytest.fixture(scope="module")
def data8(tmp_path_factory, coco):
    return subset(coco, tmp_path_factory.mktemp("data8"), 0, 8)


@pytest.fixture
def db8(tmp_path, m1, data8):
    return make_db(tmp_path / "db.db", m1, data8)


def test_reembed_then_search_space_is_that_models_search(db8, m1, m2):
    r = reembed(db8, m2, "ft")
    assert r["created"] is True and r["images_encoded"] == 8 and r["texts_encoded"] == 40
    assert r["images_failed"] == r["texts_failed"] == 0
    st = stats(db8)
    assert st["format_version"] == 3
    s = {x["name"]: x for x in st["sets"]}
    assert [x["name"] for x in st["sets"]] == ["base", "ft"]
    assert (s["base"]["dim"], s["base"]["images"], s["base"]["texts"]) == (32, 8, 40)
    assert (s["ft"]["dim"], s["ft"]["images"], s["ft"]["texts"]) == (64, 8, 40)
    m2_id = json.loads(run("model", "info", m2, "--json", check=True).stdout)["identity"]
    assert s["ft"]["model"] == m2_id and s["base"]["model"] == st["model"] != m2_id

    rows = items(db8)
    imgs = [r for r in rows if r[1] == 1]
    caps = [r for r in rows if r[1] == 2]
    ivec = embed(m2, images=[r[2] for r in imgs])
    # the stored set vectors are m2's vectors of the items (to float32 rounding)
    stored = set_rows(db8, "ft")
    np.testing.assert_allclose(np.array([stored[(1, r[0])] for r in imgs]), ivec, rtol=1e-5, atol=1e-6)
    # an image against itself: top hit, and every score is the dot product of embed's vectors
    q = imgs[3]
    got = search(db8, "--image", q[2], "--space", "ft", "--metric", "dot", "-k", "8")
    assert got[0]["id"] == q[0]
    want = ivec @ ivec[3]
    order = np.argsort(-want, kind="stable")
    assert [g["id"] for g in got] == [imgs[i][0] for i in order]
    np.testing.assert_allclose([g["score"] for g in got], want[order], rtol=1e-5, atol=1e-5)
    # a text query to captions, cosine
    tq = "a kitchen with a white refrigerator"
    qv = embed(m2, texts=[tq])[0]
    cvec = embed(m2, texts=[r[3] for r in caps])
    cos = cvec @ qv / (np.linalg.norm(cvec, axis=1) * np.linalg.norm(qv))
    got = search(db8, "--text", tq, "--space", "ft", "--target", "text", "-k", "5")
    order = np.argsort(-cos, kind="stable")[:5]
    assert [g["id"] for g in got] == [caps[i][0] for i in order]
    np.testing.assert_allclose([g["score"] for g in got], cos[order], rtol=1e-5, atol=1e-5)
    # an item query reads the item's vector of the set
    got = search(db8, "--item", caps[0][0], "--space", "ft", "--target", "text", "-k", "1")
    assert got[0]["id"] == caps[0][0] and abs(got[0]["score"] - 1) < 1e-5
    # base is untouched: the same results with and without --space base, and not m2's
    a = search(db8, "--text", tq, "-k", "5")
    assert a == search(db8, "--text", tq, "--space", "base", "-k", "5")
    assert [x["score"] for x in a] != [g["score"] for g in search(db8, "--text", tq, "--space", "ft", "-k", "5")]


def test_reembed_is_incremental_and_rm_removes_from_every_set(tmp_path, m1, m2, coco):
    data = subset(coco, tmp_path / "a", 0, 5)
    db = make_db(tmp_path / "db.db", m1, data)
    assert reembed(db, m2, "ft")["images_encoded"] == 5
    r = reembed(db, m2, "ft")
    assert (r["created"], r["images_encoded"], r["texts_encoded"]) == (False, 0, 0)
    assert (r["images_present"], r["texts_present"]) == (5, 25)
    # new items: the set lacks them, search says so, the rerun encodes only those
    more = subset(coco, tmp_path / "b", 5, 3)
    run("add", db, "--images", more / "images", "--captions", more / "captions.jsonl", "-q", check=True)
    p = run("search", db, "--text", "a dog", "--space", "ft", "-k", "3", check=True)
    assert "vector set 'ft' lacks 3 of 8 images" in p.stderr and "clipdb reembed" in p.stderr
    assert len(p.stdout.splitlines()) == 3
    r = reembed(db, m2, "ft")
    assert (r["images_encoded"], r["texts_encoded"], r["images_present"], r["texts_present"]) == (3, 15, 5, 25)
    p = run("search", db, "--text", "a dog", "--space", "ft", "-k", "3", check=True)
    assert "lacks" not in p.stderr
    s = sets(db)
    assert (s["ft"]["images"], s["ft"]["texts"]) == (8, 40)
    # rm of an image: it and its captions leave both sets
    img = [r for r in items(db) if r[1] == 1][2][0]
    run("rm", db, img, check=True)
    s = sets(db)
    assert (s["base"]["images"], s["base"]["texts"]) == (7, 35)
    assert (s["ft"]["images"], s["ft"]["texts"]) == (7, 35)
    left = {i for (_, i) in set_rows(db, "ft")}
    assert img not in left and left == {r[0] for r in items(db)}


def test_bad_requests_are_refused_and_change_nothing(db8, m1, m2, tmp_path):
    reembed(db8, m2, "ft")
    before = stats(db8)
    other = gen_model(tmp_path / "m3", "tiny", "openai", "F32", 3)
    for name in ["a b", "x" * 65, "", "../x", "ft;drop"]:
        one_line_failure(run("reembed", db8, "--model", m2, "--as", name), "reembed",
                         "bad vector set name")
    one_line_failure(run("reembed", db8, "--model", m2, "--as", "base"), "reembed", "'base'")
    line = one_line_failure(run("reembed", db8, "--model", other, "--as", "ft"), "reembed",
                            "vector set 'ft' holds the vectors of model", "--drop ft")
    assert before["sets"][1]["model"] in line
    one_line_failure(run("reembed", db8, "--model", m2, "--as", "ft", "--precision", "bf16"),
                     "reembed", "fp32 precision")
    one_line_failure(run("search", db8, "--text", "a", "--space", "nope"), "search",
                     "no vector set 'nope'", "base, ft")
    one_line_failure(run("search", db8, "--text", "a", "--space", "ft", "--index", "ivf"), "search",
                     "base vector set only")
    one_line_failure(run("search", db8, "--text", "a", "--space", "ft", "--model", m1), "search",
                     "is not the model of vector set 'ft'")
    one_line_failure(run("reembed", db8, "--drop", "nope"), "reembed", "no vector set 'nope'")
    one_line_failure(run("reembed", db8, "--drop", "base"), "reembed", "'base'")
    one_line_failure(run("reembed", db8, "--model", tmp_path / "missing", "--as", "new"), "reembed")
    assert stats(db8) == before
    # the same model found elsewhere is its model: accepted for search
    shutil.copytree(m2, tmp_path / "m2copy")
    assert search(db8, "--text", "a", "--space", "ft", "--model", tmp_path / "m2copy", "-k", "2")
    # --drop deletes the set and only it
    run("reembed", db8, "--drop", "ft", check=True)
    after = stats(db8)
    assert [s["name"] for s in after["sets"]] == ["base"] and after["images"] == before["images"]
    assert set_rows(db8, "ft") == {}
    # and the name can be used by another model now
    assert reembed(db8, other, "ft")["created"] is True


def test_missing_image_is_reported_and_counted(tmp_path, m1, m2, coco):
    data = subset(coco, tmp_path / "a", 0, 4)
    db = make_db(tmp_path / "db.db", m1, data)
    gone = sorted((data / "images").iterdir())[1]
    gone.unlink()
    r = run("reembed", db, "--model", m2, "--as", "ft", "--json", "-q")
    assert r.returncode == 1
    j = json.loads(r.stdout)
    assert (j["images_encoded"], j["images_failed"], j["texts_encoded"]) == (3, 1, 20)
    assert str(gone) in r.stderr and "1 images and 0 texts could not be encoded" in r.stderr
    assert sets(db)["ft"]["images"] == 3


def test_old_database_opens_unchanged_and_searches(tmp_path, m1, m2):
    """The committed format-1 fixture: read-only stats and searches (base, and
    an unknown set) leave its bytes as they are; the first reembed (a write)
    takes a copy to format 3 and base still searches the same."""
    p = tmp_path / "v1.db"
    shutil.copy(FIXTURE_V1, p)
    want = hashlib.sha256(FIXTURE_V1.read_bytes()).hexdigest()
    st = stats(p)
    assert st["format_version"] == 1 and [s["name"] for s in st["sets"]] == ["base"]
    a = search(p, "--text", "a white refrigerator in a kitchen", "-k", "3", "--model", m1)
    assert a == search(p, "--text", "a white refrigerator in a kitchen", "-k", "3", "--model", m1,
                       "--space", "base")
    one_line_failure(run("search", p, "--text", "a", "--space", "ft", "--model", m1), "search",
                     "no vector set 'ft'", "(it has: base)")
    run("eval", p, "--json", "-k", "1", "--no-index", "--samples", "0", check=True)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == want
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v1.db"]
    # a write: add a set. The fixture's recorded image paths (a temporary
    # folder of the machine that made it) are gone: reported, counted, exit 1
    r = reembed(p, m2, "ft", "--batch", "3", check=False)
    assert r.returncode == 1 and r.stderr.count("No such file or directory") == 4
    r = json.loads(r.stdout)
    assert (r["images_encoded"], r["images_failed"], r["texts_encoded"]) == (0, 4, 20)
    st = stats(p)
    assert st["format_version"] == 3 and [s["name"] for s in st["sets"]] == ["base", "ft"]
    assert search(p, "--text", "a white refrigerator in a kitchen", "-k", "3", "--model", m1) == a


def test_a_database_without_sets_stays_at_format_2(tmp_path, m1, data8):
    db = make_db(tmp_path / "db.db", m1, data8)
    run("rm", db, 1, check=True)
    assert stats(db)["format_version"] == 2
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_schema")}
    con.close()
    assert "vector_sets" not in names and "set_vectors" not in names


def test_eval_set_evaluates_that_sets_vectors(db8, m2):
    reembed(db8, m2, "ft")
    j = json.loads(run("eval", db8, "--set", "ft", "--json", "-k", "1,5", "--no-index",
                       "--samples", "0", check=True).stdout)
    m2_id = json.loads(run("model", "info", m2, "--json", check=True).stdout)["identity"]
    assert j["vector_set"] == "ft" and j["model"] == m2_id
    # R@1 text->image from the set's vectors, computed here
    rows = items(db8)
    con = sqlite3.connect(db8)
    cap_img = dict(con.execute("SELECT id, image FROM items WHERE type = 2").fetchall())
    con.close()
    v = set_rows(db8, "ft")
    img_ids = [r[0] for r in rows if r[1] == 1]
    iv = np.array([v[(1, i)] for i in img_ids])
    iv /= np.linalg.norm(iv, axis=1, keepdims=True)
    hits = 0
    for cid, im in cap_img.items():
        c = v[(2, cid)] / np.linalg.norm(v[(2, cid)])
        s = iv @ c
        right = img_ids.index(im)
        rank = 1 + np.sum(s > s[right]) + np.sum((s == s[right]) & (np.array(img_ids) < im))
        hits += rank <= 1
    assert abs(j["t2i"]["R@1"] - hits / len(cap_img)) < 1e-9
    # without --set: every set of the database, base first
    j = json.loads(run("eval", db8, "--json", "-k", "1", "--no-index", "--samples", "0",
                       check=True).stdout)
    assert [s["name"] for s in j["sets"]] == ["base", "ft"]
    one_line_failure(run("eval", db8, "--set", "nope", "-k", "1", "--no-index"), "eval",
                     "no vector set 'nope'",
                     "base, ft")


def test_sigkill_during_reembed_then_rerun_equals_a_clean_reembed(tmp_path, m1, coco):
    """~200 images: reembed is killed with SIGKILL after its first committed
    batch; the rerun finishes; every item is in the set exactly once and the
    searches equal those of a clean reembed."""
    m3 = gen_model(tmp_path / "m3", "tiny", "openai", "F32", 3)
    data = subset(coco, tmp_path / "data", 0, 200)
    db = make_db(tmp_path / "db.db", m1, data)
    n_items = len(items(db))
    proc = subprocess.Popen([BIN, "reembed", str(db), "--model", str(m3), "--as", "ft",
                             "--batch", "8", "-q"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    seen = 0
    while time.time() < deadline and proc.poll() is None:
        s = sets(db).get("ft")
        seen = s["images"] + s["texts"] if s else 0
        if seen >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "reembed finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = sets(db)["ft"]
    assert 8 <= partial["images"] + partial["texts"] < n_items
    assert partial["images"] % 8 == 0 and partial["texts"] == 0  # whole batches only
    r = reembed(db, m3, "ft", "--batch", "8")
    assert r["created"] is False and r["images_present"] == partial["images"]
    assert r["images_encoded"] == 200 - partial["images"] and r["texts_encoded"] == n_items - 200
    con = sqlite3.connect(db)
    dup = con.execute("SELECT count(*) FROM (SELECT type, id FROM set_vectors GROUP BY type, id "
                      "HAVING count(*) > 1)").fetchone()[0]
    con.close()
    got = set_rows(db, "ft")
    assert dup == 0 and len(got) == n_items and {i for (_, i) in got} == {r[0] for r in items(db)}
    # a clean reembed of a copy (the set dropped first)
    clean = tmp_path / "clean.db"
    shutil.copy(db, clean)
    run("reembed", clean, "--drop", "ft", check=True)
    reembed(clean, m3, "ft", "--batch", "8")
    want = set_rows(clean, "ft")
    assert want.keys() == got.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    for args in (["--text", "a dog catching a frisbee"], ["--text", "a plate of food", "--target", "text"],
                 ["--item", "7"]):
        a = search(db, *args, "--space", "ft", "-k", "10")
        b = search(clean, *args, "--space", "ft", "-k", "10")
        assert [x["id"] for x in a] == [x["id"] for x in b]
        np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-5)


def test_ctrl_c_stops_after_a_commit_and_the_rerun_finishes(tmp_path, m1, coco):
    m3 = gen_model(tmp_path / "m3", "tiny", "openai", "F32", 3)
    data = subset(coco, tmp_path / "data", 0, 60)
    db = make_db(tmp_path / "db.db", m1, data)
    proc = subprocess.Popen([BIN, "reembed", str(db), "--model", str(m3), "--as", "ft",
                             "--batch", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        s = sets(db).get("ft")
        if s and s["images"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "reembed finished before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped on request" in err and "run the same command again" in err
    done = sets(db)["ft"]
    assert done["images"] % 2 == 0 and 2 <= done["images"] < 60
    r = reembed(db, m3, "ft")
    assert r["images_present"] == done["images"] and r["images_encoded"] == 60 - done["images"]
    assert sets(db)["ft"]["images"] == 60 and sets(db)["ft"]["texts"] == 300


def test_help_teaches_vector_sets():
    h = run("reembed", "--help", check=True).stdout
    assert h.startswith("usage: clipdb reembed")
    for s in ["VECTOR SET", "base", "finetune", "--space finetuned", "eval", "--set finetuned",
              "--drop NAME"]:
        assert s in h, s
    assert "--space NAME" in run("search", "--help", check=True).stdout
