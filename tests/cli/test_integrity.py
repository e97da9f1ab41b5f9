"""Identity and integrity of what a database stores (issue 9), through the
real binary:

- the tokenizer is part of the model identity a database checks: a model
  directory whose merges.txt lost lines is refused for a database built with
  the full tokenizer (a clear message naming the tokenizer), the intact one
  and the same tokenizer in its other file form are accepted, and a database
  made before the digest was recorded (the v1 fixture) still opens and
  records it on its next write;
- `clipdb check DB [--json]`: a clean database passes; each damage made here
  with Python's sqlite3 module (an orphan caption, an Inf or NaN component, a
  wrong norm, a missing index entry, a duplicate text, ...) is found and named
  by item id, with exit status 1.
"""
import json
import math
import shutil
import sqlite3
import struct

import pytest

from conftest import ROOT, gen_model, one_line_failure, run

FIXTURE_V1 = ROOT / "tests" / "fixtures" / "v1-tiny-seed1.db"


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared):
    """The tiny seed-1 model with its tokenizer as vocab.json + merges.txt
    (hf), the same weights with bpe_simple_vocab_16e6.txt.gz (bpe), and the
    hf one with the last 200 lines of merges.txt cut (damaged)."""
    base = tmp_path_factory.mktemp("tokid")
    hf = gen_model(base / "hf", "tiny", "openai", "F32", 1, "--tokenizer", "hf")
    bpe = gen_model(base / "bpe", "tiny", "openai", "F32", 1, "--tokenizer", "bpe")
    damaged = base / "damaged"
    shutil.copytree(hf, damaged)
    lines = (hf / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (damaged / "merges.txt").write_text("".join(lines[:-200]), encoding="utf-8")
    return {"hf": hf, "bpe": bpe, "damaged": damaged}


def info(model):
    return json.loads(run("model", "info", model, "--json", check=True).stdout)


def meta(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    m = dict(con.execute("SELECT key, value FROM meta").fetchall())
    con.close()
    return m


def test_tokenizer_digest_is_recorded_and_checked(tmp_path, models):
    hf, bpe, damaged = models["hf"], models["bpe"], models["damaged"]
    # the weights are one model; the damaged tokenizer is another tokenizer
    assert info(hf)["identity"] == info(damaged)["identity"] == info(bpe)["identity"]
    assert info(hf)["tokenizer_digest"] == info(bpe)["tokenizer_digest"]
    assert info(damaged)["tokenizer_digest"] != info(hf)["tokenizer_digest"]
    db = tmp_path / "a.db"
    run("init", db, "--model", hf, check=True)
    assert meta(db)["tokenizer_digest"] == info(hf)["tokenizer_digest"]
    t = tmp_path / "t.txt"
    t.write_text("a dog on a beach\na red bus in the street\n")
    run("add", db, "--texts", t, "-q", check=True)
    before = meta(db)
    for cmd in (["search", db, "--text", "a dog on a beach", "--target", "text"],
                ["add", db, "--texts", t]):
        p = run(*cmd, "--model", damaged)
        line = one_line_failure(p, cmd[0], "tokenizer", str(damaged),
                                info(damaged)["tokenizer_digest"][:16],
                                info(hf)["tokenizer_digest"][:16])
        assert "not the tokenizer this database was created with" in line
    assert meta(db) == before  # nothing written
    # the intact tokenizer, in either file form, finds the stored text itself
    for m in (hf, bpe):
        r = json.loads(run("search", db, "--text", "a dog on a beach", "--target", "text",
                           "-k", "1", "--json", "--model", m, check=True).stdout)
        assert r["results"][0]["text"] == "a dog on a beach"
        assert abs(r["results"][0]["score"] - 1.0) < 1e-5


def test_old_database_opens_and_records_the_digest_on_its_next_write(tmp_path, models):
    """The v1 fixture (written before tokenizer digests) opens with the
    weights' identity alone; its next write with a model records that
    model's tokenizer, which is checked from then on."""
    hf, damaged = models["hf"], models["damaged"]
    db = tmp_path / "v1.db"
    shutil.copy(FIXTURE_V1, db)
    assert "tokenizer_digest" not in meta(db)
    if json.loads(run("stats", db, "--json", check=True).stdout)["model"] != info(hf)["identity"]:
        pytest.fail("tools/gen_model.py --size tiny --seed 1 no longer writes the v1 fixture's "
                    "model (see tests/fixtures/README.md)")
    # read-only use: accepted with the weights check alone, nothing recorded
    run("search", db, "--text", "a kitchen", "--target", "text", "--model", damaged, check=True)
    run("search", db, "--text", "a kitchen", "--model", hf, check=True)
    assert "tokenizer_digest" not in meta(db)
    t = tmp_path / "t.txt"
    t.write_text("a brand new caption\n")
    run("add", db, "--texts", t, "--model", hf, "-q", check=True)
    assert meta(db)["tokenizer_digest"] == info(hf)["tokenizer_digest"]
    p = run("search", db, "--text", "a kitchen", "--target", "text", "--model", damaged)
    one_line_failure(p, "search", "tokenizer", str(damaged))
    run("search", db, "--text", "a kitchen", "--target", "text", "--model", hf, check=True)


def test_corrupt_recorded_digest_is_refused(tmp_path, models):
    db = tmp_path / "c.db"
    run("init", db, "--model", models["hf"], check=True)
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = 'not a digest' WHERE key = 'tokenizer_digest'")
    con.commit()
    con.close()
    one_line_failure(run("stats", db), "stats", "corrupt tokenizer_digest")


# ---- clipdb check -------------------------------------------------------------

N_IMAGES, N_TEXTS = 10, 6


@pytest.fixture(scope="module")
def clean_db(tmp_path_factory, models):
    """10 generated images with 2 captions each, 6 standalone texts, IVF
    indexes of both sets and a stored Faiss index of the texts."""
    from PIL import Image
    d = tmp_path_factory.mktemp("checkdb")
    imgs = d / "im"
    imgs.mkdir()
    with open(d / "c.jsonl", "w") as f:
        for i in range(N_IMAGES):
            Image.new("RGB", (24 + i, 20), (i * 20 % 256, 90, 200 - i)).save(imgs / f"p{i}.png")
            f.write(json.dumps({"image": f"p{i}.png", "captions": [f"a photo {i}", f"a view {i}"],
                                "split": "val"}) + "\n")
    (d / "t.txt").write_text("".join(f"standalone text {i}\n" for i in range(N_TEXTS)))
    db = d / "clean.db"
    run("init", db, "--model", models["hf"], check=True)
    run("add", db, "--images", imgs, "--captions", d / "c.jsonl", "-q", check=True)
    run("add", db, "--texts", d / "t.txt", "-q", check=True)
    run("index", db, "--ivf", "--nlist", "3", check=True)
    run("index", db, "--faiss", "Flat", "--target", "text", check=True)
    return db


def copy_db(src, dst):
    """A consistent copy (WAL included) through SQLite's backup."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    a.backup(b)
    a.close()
    b.close()
    return dst


def check(db, *extra):
    p = run("check", db, "--json", *extra)
    assert p.returncode in (0, 1), p.stderr
    r = json.loads(p.stdout)
    assert r["ok"] == (p.returncode == 0) == (r["n_problems"] == 0)
    return r


def ids(con, sql):
    return [r[0] for r in con.execute(sql).fetchall()]


def test_check_passes_a_clean_database(clean_db):
    r = check(clean_db)
    assert r["problems"] == [] and r["n_problems"] == 0, r
    assert (r["items"], r["vectors"], r["indexes"]) == (N_IMAGES * 3 + N_TEXTS,) * 2 + (3,)
    p = run("check", clean_db)
    assert p.returncode == 0 and p.stdout.strip().endswith(
        f"{r['items']} items, {r['vectors']} vectors, 3 indexes checked: ok"), p.stdout
    assert check(clean_db, "--quick")["ok"]


def blob(values):
    return struct.pack(f"<{len(values)}f", *values)


def vec(con, table, i):
    return list(struct.unpack(f"<{len(con.execute(f'SELECT vec FROM {table} WHERE id = ?', (i,)).fetchone()[0]) // 4}f",
                              con.execute(f"SELECT vec FROM {table} WHERE id = ?", (i,)).fetchone()[0]))


def damage_orphan_captions(con):
    """The image is deleted with its vector, metadata and index entries (as
    a racing rm did), its captions are left."""
    img = ids(con, "SELECT id FROM items WHERE type = 1 ORDER BY id")[3]
    caps = ids(con, f"SELECT id FROM items WHERE image = {img}")
    for sql in ("DELETE FROM items WHERE id = ?", "DELETE FROM vectors_image WHERE id = ?",
                "DELETE FROM item_meta WHERE item = ?", "DELETE FROM ivf_assign WHERE id = ?"):
        con.execute(sql, (img,))
    return {("orphan_caption", c) for c in caps}


def damage_component(value):
    def damage(con):
        i = ids(con, "SELECT id FROM vectors_image ORDER BY id")[2]
        v = vec(con, "vectors_image", i)
        v[5] = value
        con.execute("UPDATE vectors_image SET vec = ? WHERE id = ?", (blob(v), i))
        return {("vector", i)}
    return damage


def damage_norm(con):
    i = ids(con, "SELECT id FROM vectors_text ORDER BY id")[4]
    con.execute("UPDATE vectors_text SET norm = 1e-30 WHERE id = ?", (i,))
    return {("vector", i)}


def damage_vector_size(con):
    i = ids(con, "SELECT id FROM vectors_text ORDER BY id")[1]
    con.execute("UPDATE vectors_text SET vec = substr(vec, 1, 12) WHERE id = ?", (i,))
    return {("vector", i)}


def damage_index_entry(con):
    i = ids(con, "SELECT id FROM ivf_assign WHERE target = 1 ORDER BY id")[5]
    con.execute("DELETE FROM ivf_assign WHERE target = 1 AND id = ?", (i,))
    return {("index", i)}


def damage_index_list(con):
    i = ids(con, "SELECT id FROM ivf_assign WHERE target = 2 ORDER BY id")[0]
    con.execute("UPDATE ivf_assign SET list = 7 WHERE target = 2 AND id = ?", (i,))
    return {("index", i)}


def damage_duplicate_text(con):
    a, b = ids(con, "SELECT id FROM items WHERE type = 2 AND image IS NULL ORDER BY id")[:2]
    con.execute("UPDATE items SET text = (SELECT text FROM items WHERE id = ?) WHERE id = ?", (a, b))
    return {("duplicate_text", b)}


def damage_duplicate_caption(con):
    img = ids(con, "SELECT id FROM items WHERE type = 1 ORDER BY id")[0]
    a, b = ids(con, f"SELECT id FROM items WHERE image = {img} ORDER BY id")
    con.execute("UPDATE items SET text = (SELECT text FROM items WHERE id = ?) WHERE id = ?", (a, b))
    return {("duplicate_text", b)}


def damage_duplicate_path(con):
    a, b = ids(con, "SELECT id FROM items WHERE type = 1 ORDER BY id")[:2]
    con.execute("DROP INDEX items_abspath")
    con.execute("UPDATE items SET abspath = (SELECT abspath FROM items WHERE id = ?) WHERE id = ?",
                (a, b))
    return {("duplicate_path", b)}


def damage_missing_vector(con):
    i = ids(con, "SELECT id FROM items WHERE type = 2 AND image IS NULL ORDER BY id")[2]
    con.execute("DELETE FROM vectors_text WHERE id = ?", (i,))
    # still in the IVF lists and the Faiss index, without a vector
    return {("missing_vector", i), ("index", i)}


def damage_orphan_vector(con):
    i = ids(con, "SELECT id FROM items WHERE type = 2 AND image IS NULL ORDER BY id")[3]
    con.execute("DELETE FROM items WHERE id = ?", (i,))
    return {("orphan_vector", i)}


def damage_faiss_deleted_unmarked(con):
    i = ids(con, "SELECT id FROM items WHERE type = 2 AND image IS NULL ORDER BY id")[5]
    for sql in ("DELETE FROM items WHERE id = ?", "DELETE FROM vectors_text WHERE id = ?",
                "DELETE FROM ivf_assign WHERE id = ?"):
        con.execute(sql, (i,))
    return {("index", i)}


def damage_faiss_bytes(con):
    con.execute("UPDATE faiss SET blob = substr(blob, 1, 100) || x'00' || substr(blob, 102)")
    return {("index", None)}


def damage_high_water(con):
    last = max(ids(con, "SELECT id FROM items"))
    con.execute("UPDATE meta SET value = ? WHERE key = 'last_item_id'", (str(last - 2),))
    return {("high_water", last - 1), ("high_water", last)}


def damage_orphan_meta(con):
    con.execute("INSERT INTO item_meta(item, key, value) VALUES(99999, 'split', 'x')")
    return {("orphan_meta", 99999)}


DAMAGES = {
    "orphan_captions": damage_orphan_captions,
    "inf_component": damage_component(math.inf),
    "nan_component": damage_component(math.nan),
    "wrong_norm": damage_norm,
    "short_vector": damage_vector_size,
    "missing_index_entry": damage_index_entry,
    "index_list_out_of_range": damage_index_list,
    "duplicate_text": damage_duplicate_text,
    "duplicate_caption": damage_duplicate_caption,
    "duplicate_path": damage_duplicate_path,
    "missing_vector": damage_missing_vector,
    "orphan_vector": damage_orphan_vector,
    "faiss_deleted_unmarked": damage_faiss_deleted_unmarked,
    "faiss_bytes": damage_faiss_bytes,
    "high_water": damage_high_water,
    "orphan_meta": damage_orphan_meta,
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_check_finds_each_damage_by_item_id(tmp_path, clean_db, name):
    db = copy_db(clean_db, tmp_path / "d.db")
    con = sqlite3.connect(db)
    want = DAMAGES[name](con)
    con.commit()
    con.close()
    r = check(db)
    got = {(p["kind"], p["item"]) for p in r["problems"]}
    assert got == want, r["problems"]
    assert r["n_problems"] == len(r["problems"]) and not r["truncated"]
    for p in r["problems"]:  # the message names the item
        assert p["item"] is None or str(p["item"]) in p["message"], p
    # the plain output: one line per problem, then the summary; exit 1
    p = run("check", db)
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    n = r["n_problems"]
    assert len(lines) == n + 1 and lines[-1].endswith("problems found"), p.stdout
    assert p.stderr.strip() == f"clipdb check: {db}: {n} problem{'s' if n > 1 else ''} found"


def overwrite_pages(db, pages):
    """Overwrites the cell pointers of the given pages (0-based; the last
    when negative) of a copy without WAL; returns the page count."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    n = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    data = bytearray(db.read_bytes())
    for k in pages:
        k %= n
        data[k * page + 8: k * page + 40] = bytes(range(1, 33))
    db.write_bytes(bytes(data))
    return n


def test_check_reports_a_damaged_page(tmp_path, clean_db):
    """The last page of the file overwritten: SQLite's integrity check
    reports it, one problem per line of its report, and the invariants are
    still checked where the tables can be read."""
    db = copy_db(clean_db, tmp_path / "p.db")
    overwrite_pages(db, [-1])
    r = check(db)
    integ = [q for q in r["problems"] if q["kind"] == "integrity"]
    assert integ and not r["ok"], r
    assert all("\n" not in q["message"] and q["item"] is None for q in integ)
    assert r["items"] == N_IMAGES * 3 + N_TEXTS


def test_check_reports_a_damaged_file(tmp_path, clean_db):
    """Every page but the header's overwritten: either refused at open with
    one clear line or reported by the integrity check; never a crash."""
    db = copy_db(clean_db, tmp_path / "f.db")
    con = sqlite3.connect(db)
    n = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    overwrite_pages(db, range(1, n))
    p = run("check", db, "--json")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr
    if p.stdout:
        r = json.loads(p.stdout)
        assert any(q["kind"] == "integrity" for q in r["problems"]), r
    else:  # refused at open: one clear line
        one_line_failure(p, "check", str(db))


def test_check_many_problems_are_counted_and_capped(tmp_path, clean_db):
    db = copy_db(clean_db, tmp_path / "m.db")
    con = sqlite3.connect(db)
    con.executemany("INSERT INTO item_meta(item, key, value) VALUES(?, 'k', 1)",
                    [(100000 + i,) for i in range(1200)])
    con.commit()
    con.close()
    r = check(db)
    assert r["n_problems"] == 1200 and len(r["problems"]) == 1000 and r["truncated"]


def test_check_usage(clean_db, tmp_path):
    assert run("check").returncode == 2
    assert run("check", clean_db, "--bogus").returncode == 2
    one_line_failure(run("check", tmp_path / "absent.db"), "check", "absent.db")
    assert "usage: clipdb check" in run("check", "--help", check=True).stdout
