"""clipdb_model_identity caches the weights' digest in the user's cache
directory ($XDG_CACHE_HOME/clipdb, else ~/.cache/clipdb), never in the model
directory: a read-only model directory gets no file, and everything works
(uncached) when no cache directory is writable."""
import json
import os
import stat

import pytest

from conftest import gen_model, run


@pytest.fixture(scope="module")
def ro_model(tmp_path_factory, shared):
    m = gen_model(tmp_path_factory.mktemp("ro") / "tiny", seed=4)
    for f in m.iterdir():
        f.chmod(0o444)
    m.chmod(0o555)
    yield m
    m.chmod(0o755)


def listing(d):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir())


def search_works(tmp_path, model, env):
    db = tmp_path / "a.db"
    texts = tmp_path / "t.txt"
    texts.write_text("a dog on a beach\ntwo horses\n")
    run("init", db, "--model", model, check=True, env=env)
    run("add", db, "--texts", texts, "-q", check=True, env=env)
    p = run("search", db, "--text", "a dog", "--target", "text", "-k", "1", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[0])["results"][0]["text"] == "a dog on a beach"


def test_read_only_model_dir_gets_no_file(tmp_path, ro_model):
    before = listing(ro_model)
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    search_works(tmp_path, ro_model, env)
    assert listing(ro_model) == before
    cached = list((cache / "clipdb" / "identity").iterdir())
    assert len(cached) == 1
    size, mtime, digest = cached[0].read_text().split()
    assert int(size) == (ro_model / "model.safetensors").stat().st_size and len(digest) == 64
    info = json.loads(run("model", "info", ro_model, "--json", check=True, env=env).stdout)
    assert info["identity"].endswith(digest[:16])


def test_no_writable_cache_dir_still_works(tmp_path, ro_model):
    before = listing(ro_model)
    env = {"XDG_CACHE_HOME": "/proc/clipdb-no-such-dir", "HOME": "/proc/clipdb-no-such-dir"}
    search_works(tmp_path, ro_model, env)
    assert listing(ro_model) == before
