"""The server over a database with two vector sets (clipdb reembed): /api/stats
lists them and /api/search searches the one named by `space`, with the same
answers as `clipdb search --space`."""
import json

import pytest

from serverlib import gen_model, run


@pytest.fixture
def two_sets(db_copy, tmp_path):
    m2 = gen_model(tmp_path / "m2", "small", "openai", "F32", 7)
    run("reembed", db_copy, "--model", m2, "--as", "ft", "-q", check=True)
    return db_copy


def cli(db, *args):
    return json.loads(run("search", db, "--json", *args, check=True).stdout)["results"]


def same(a, b):
    assert [x["id"] for x in a] == [x["id"] for x in b]
    assert all(abs(x["score"] - y["score"]) < 1e-6 for x, y in zip(a, b))


def test_stats_lists_the_sets_and_search_takes_space(start_server, two_sets):
    s = start_server(two_sets)
    st, stats = s.json("GET", "/api/stats")
    assert st == 200 and stats["vector_sets"] == ["base", "ft"]
    ft = stats["sets"][1]
    assert (ft["name"], ft["dim"], ft["images"], ft["texts"]) == ("ft", 64, 6, 12)
    assert stats["sets"][0]["dim"] == stats["embed_dim"] == 32

    st, res = s.json("POST", "/api/search", {"text": "a red square", "k": 4, "space": "ft"})
    assert st == 200, res
    assert res["query"]["vectors"] == "ft"
    same(res["results"], cli(two_sets, "--text", "a red square", "-k", "4", "--space", "ft"))
    st, base = s.json("POST", "/api/search", {"text": "a red square", "k": 4})
    same(base["results"], cli(two_sets, "--text", "a red square", "-k", "4"))
    assert [x["score"] for x in base["results"]] != [x["score"] for x in res["results"]]
    # the older name of the parameter
    st, old = s.json("POST", "/api/search", {"text": "a red square", "k": 4, "vectors": "ft"})
    same(old["results"], res["results"])
    # an upload (multipart) with space
    photo = two_sets.parent / "images" / "photo2.jpg"
    st, up = s.form("/api/search", [("k", "3"), ("space", "ft")], [("image", "p.jpg", photo.read_bytes())])
    assert st == 200, up
    same(up["results"], cli(two_sets, "--image", photo, "-k", "3", "--space", "ft"))
    assert up["results"][0]["path"].endswith("photo2.jpg")
    # refusals
    st, e = s.json("POST", "/api/search", {"text": "a", "space": "ft", "index": "ivf"})
    assert st == 400 and "base vector set only" in e["error"]
    st, e = s.json("POST", "/api/search", {"text": "a", "space": "nope"})
    assert st == 404 and "base, ft" in e["error"]
