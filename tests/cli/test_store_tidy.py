"""The store's error rule, indexes and statistics through the real binary
and the public API (examples/search prints the status code name). Needs no
shared data: images are drawn with PIL, the model is a seeded random one."""
import json
import os
import pathlib
import struct
import subprocess
import zlib

import pytest
from PIL import Image

from conftest import gen_model, one_line_failure, run

BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", pathlib.Path(__file__).parents[2] / "build"))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tidy")
    model = gen_model(tmp / "tiny", seed=3)
    images = tmp / "images"
    images.mkdir()
    for i in range(12):
        Image.new("RGB", (40 + i, 32), ((i * 40) % 256, (i * 90) % 256, (i * 150) % 256)).save(
            images / f"im{i:02d}.png")
    texts = tmp / "texts.txt"
    texts.write_text("".join(f"text number {i} about a {w}\n"
                             for i, w in enumerate(["dog", "cat", "bus", "tree"] * 3)))
    path = tmp / "tidy.db"
    run("init", path, "--model", model, check=True)
    # four decode threads whatever the machine: the TSan run (make tsan) checks
    # the ingest pipeline through this fixture
    run("add", path, "--images", images, "--texts", texts, "--threads", "4", "-q", check=True)
    return path


def example(db, query):
    return subprocess.run([str(BUILD / "examples" / "search"), str(db), query, "3"],
                          capture_output=True, text=True)


def test_ivf_without_target_builds_both(db, tmp_path):
    p = tmp_path / "both.db"
    p.write_bytes(db.read_bytes())
    r = run("index", p, "--ivf", "--nlist", "3", check=True)
    assert "image vectors" in r.stdout and "text vectors" in r.stdout
    s = json.loads(run("stats", p, "--json", check=True).stdout)
    assert sorted((i["kind"], i["target"]) for i in s["indexes"]) == \
        [("ivf", "image"), ("ivf", "text")]
    # a text IVF search works, and with every list probed equals exact search
    ivf = json.loads(run("search", p, "--text", "a dog", "--target", "text", "--index", "ivf",
                         "--nprobe", "3", "-k", "5", "--json", check=True).stdout)["results"]
    ex = json.loads(run("search", p, "--text", "a dog", "--target", "text", "-k", "5",
                        "--json", check=True).stdout)["results"]
    assert [x["id"] for x in ivf] == [x["id"] for x in ex]
    assert "both" in run("index", "--help").stdout


def test_stats_lists_more_than_eight_indexes(db, tmp_path):
    p = tmp_path / "twelve.db"
    p.write_bytes(db.read_bytes())
    for target in ("image", "text"):
        for metric in ("cosine", "dot", "l2"):
            run("index", p, "--ivf", "--nlist", "2", "--target", target, "--metric", metric,
                check=True)
            run("index", p, "--faiss", "Flat", "--target", target, "--metric", metric,
                check=True)
    s = json.loads(run("stats", p, "--json", check=True).stdout)
    assert len(s["indexes"]) == 12
    assert sum(i["kind"] == "faiss" for i in s["indexes"]) == 6
    text = run("stats", p, check=True).stdout
    assert text.count("index ") == 12


def test_search_keeps_the_decoders_status_code(db, tmp_path):
    p = example(db, "image:" + str(tmp_path / "missing.png"))
    assert p.returncode == 1
    assert p.stderr.startswith(("CLIPDB_ENOTFOUND:", "CLIPDB_EIO:")), p.stderr
    assert "missing.png" in p.stderr
    ihdr = struct.pack(">IIBBBBB", 1_000_000, 1_000_000, 8, 2, 0, 0, 0)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    p = example(db, "image:" + str(huge))
    assert p.returncode == 1 and p.stderr.startswith("CLIPDB_ELIMIT:"), p.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    p = example(db, "image:" + str(bad))
    assert p.returncode == 1 and p.stderr.startswith("CLIPDB_EFORMAT:"), p.stderr
    # the encoder's code: an empty text is EINVAL, not a generic error
    p = example(db, "")
    assert p.returncode == 1 and p.stderr.startswith("CLIPDB_EINVAL:"), p.stderr
    # and the good path still works
    good = next((db.parent / "images").glob("*.png"))
    p = example(db, "image:" + str(good))
    assert p.returncode == 0 and good.name in p.stdout.splitlines()[0], p.stdout


def test_cli_adds_the_hints_not_the_library(db, tmp_path):
    r = run("search", db, "--text", "x", "--target", "text", "--index", "ivf", "--metric", "dot")
    one_line_failure(r, "search", "no IVF index for text vectors and metric dot",
                     "clipdb index", "--ivf --target text --metric dot")
    r = run("stats", tmp_path / "nope.db")
    one_line_failure(r, "stats", "nope.db", "clipdb init")
    r = run("search", db, "--text", "x", "-k", str(1 << 25))
    assert r.returncode == 2 and str(1 << 24) in r.stderr


def test_search_json_metadata_fields(db):
    res = json.loads(run("search", db, "--text", "a tree", "--target", "text", "-k", "2",
                         "--json", check=True).stdout)["results"]
    assert len(res) == 2 and all("text" in x and "score" in x for x in res)
