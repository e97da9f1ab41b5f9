"""Every program in examples/ runs, and gives what the CLI gives: the
library API in include/clipdb.h is enough to use clipdb from C."""
import json
import os
import pathlib
import shutil
import subprocess

import pytest

from conftest import gen_model, run

BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", pathlib.Path(__file__).parents[2] / "build"))


@pytest.fixture(scope="module")
def db(tmp_path_factory, shared):
    tmp = tmp_path_factory.mktemp("ex")
    model = gen_model(tmp / "tiny", seed=7)
    images = tmp / "images"
    images.mkdir()
    for p in sorted((shared / "data" / "coco-subset" / "images").glob("*.jpg"))[:6]:
        shutil.copy(p, images / p.name)
    path = tmp / "ex.db"
    run("init", path, "--model", model, check=True)
    run("add", path, "--images", images, "-q", check=True)
    return path


def test_search_example_matches_cli(db):
    exe = BUILD / "examples" / "search"
    assert exe.is_file(), f"{exe} not built (make examples)"
    p = subprocess.run([str(exe), str(db), "a red bus", "4"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = [line.split("\t") for line in p.stdout.splitlines()]
    cli = json.loads(run("search", db, "--text", "a red bus", "-k", "4", "--json",
                         check=True).stdout)["results"]
    assert [int(g[0]) for g in got] == [r["id"] for r in cli]
    assert [g[2] for g in got] == [r["path"] for r in cli]
    for g, r in zip(got, cli):
        assert abs(float(g[1]) - r["score"]) < 1e-5


def test_search_example_reports_errors(tmp_path):
    bogus = tmp_path / "not.db"
    bogus.write_bytes(b"hello, not a database" * 100)
    p = subprocess.run([str(BUILD / "examples" / "search"), str(bogus), "x"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "not.db" in p.stderr, p.stderr
