"""Fixtures of the server tests: a small database (seeded random tiny model,
generated photos with captions, an IVF index) and servers started on it."""
import json
import shutil
import sys
import pathlib

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from serverlib import TOKEN, Server, gen_model, make_images, run  # noqa: E402

@pytest.fixture(scope="session")
def base_db(tmp_path_factory):
    """A database built once; tests that write get a copy (db_copy)."""
    d = tmp_path_factory.mktemp("serverdb")
    model = gen_model(d / "model", "tiny", "openai", "F32", 3)
    caps = make_images(d / "images")
    with open(d / "captions.jsonl", "w") as f:
        for c in caps:
            f.write(json.dumps(c) + "\n")
    (d / "texts.txt").write_text("a standalone text\nanother standalone line\n")
    db = d / "photos.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--images", d / "images", "--captions", d / "captions.jsonl", check=True)
    run("add", db, "--texts", d / "texts.txt", check=True)
    run("index", db, "--ivf", "--nlist", "2", "--target", "image", check=True)
    return db


@pytest.fixture
def db_copy(base_db, tmp_path):
    """A private copy of the database with its own images (recorded paths
    point into tmp_path), for tests that write or tamper with files."""
    src = base_db.parent
    shutil.copytree(src / "model", tmp_path / "model")
    caps = make_images(tmp_path / "images")
    with open(tmp_path / "captions.jsonl", "w") as f:
        for c in caps:
            f.write(json.dumps(c) + "\n")
    db = tmp_path / "photos.db"
    run("init", db, "--model", tmp_path / "model", check=True)
    run("add", db, "--images", tmp_path / "images", "--captions", tmp_path / "captions.jsonl", check=True)
    return db


@pytest.fixture
def start_server():
    started = []

    def start(db, *args):
        s = Server(db, *args)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def server(base_db):
    """A read-write server with the token, shared by a test module (tests
    through it do not write)."""
    s = Server(base_db, "--token", TOKEN, "--threads", "3")
    yield s
    rc, err = s.stop()
    assert rc == 0, err
