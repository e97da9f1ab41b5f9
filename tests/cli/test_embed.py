"""Black-box tests of `clipdb embed`: usage, JSON format, order. Bad inputs
(exit 1, one line naming the input and the reason) are in test_bad_input.py.
Runs again under ASan via `make asan`."""
import json

import numpy as np
import pytest

from conftest import gen_model, run



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("m") / "tiny", seed=3)


@pytest.fixture(scope="module")
def photos(shared):
    coco = sorted((shared / "data" / "coco-subset" / "images").glob("*.jpg"))[:2]
    flickr = sorted((shared / "data" / "flickr8k" / "images").glob("*.jpg"))[:2]
    return [str(p) for p in coco + flickr]


def test_help_teaches():
    p = run("embed", "--help")
    assert p.returncode == 0
    for opt in ("--model", "--text", "--image", "--texts-from", "--images-from", "--json",
                "--truncate", "example"):
        assert opt in p.stdout


def test_usage_errors_exit_2(model):
    assert run("embed", "--text", "x").returncode == 2           # no --model
    assert run("embed", "--model", model).returncode == 2         # nothing to embed
    assert run("embed", "--model", model, "--bogus").returncode == 2
    assert run("embed", "--model", model, "--image").returncode == 2


def test_json_images_in_order(model, photos, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(photos[2] + "\n\n" + photos[3] + "\r\n")
    p = run("embed", "--model", model, "--json", "--image", photos[1], "--images-from", lst,
            "--image", photos[0])
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert [r["input"] for r in rows] == [photos[1], photos[2], photos[3], photos[0]]
    assert all(r["type"] == "image" and len(r["embedding"]) == 32 for r in rows)
    v = np.array([r["embedding"] for r in rows])
    assert np.all(np.isfinite(v)) and np.linalg.norm(v[0] - v[3]) > 1e-3
    # the same image alone gives the same vector as inside a batch
    q = run("embed", "--model", model, "--json", "--image", photos[0])
    np.testing.assert_allclose(json.loads(q.stdout)["embedding"], v[3], rtol=0, atol=1e-5)
    # readable form
    r = run("embed", "--model", model, "--image", photos[0])
    assert r.returncode == 0 and "norm" in r.stdout and photos[0] in r.stdout


def test_json_texts_and_images_interleaved(model, photos, tmp_path):
    tf = tmp_path / "t.txt"
    tf.write_text("a dog on a beach\nA man riding a bike.\n")
    p = run("embed", "--model", model, "--json", "--text", "a photo of a cat", "--image", photos[0],
            "--texts-from", tf, "--text", 'quote " and \\ back')
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert [(r["type"], r["input"]) for r in rows] == [
        ("text", "a photo of a cat"), ("image", photos[0]), ("text", "a dog on a beach"),
        ("text", "A man riding a bike."), ("text", 'quote " and \\ back')]
