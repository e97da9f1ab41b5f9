"""`clipdb eval` through the binary: the JSON the issue asks for, the plots and
the self-contained HTML report, and clear errors for bad input (one stderr
line, exit 1; bad usage exit 2). Data: 30 COCO images (20 val2017, 10
train2017) with their captions and one more image with no caption; a generated
tiny model (random weights)."""
import json
import os

import pytest

from conftest import gen_model, one_line_failure, run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", seed=7)


@pytest.fixture(scope="module")
def db(shared, tmp_path_factory, model):
    src = shared / "data" / "coco-subset"
    base = tmp_path_factory.mktemp("evaldb")
    imgs = base / "images"
    imgs.mkdir()
    entries = [json.loads(l) for l in (src / "captions.jsonl").read_text().splitlines() if l.strip()]
    val = [e for e in entries if e["split"] == "val2017"][:20]
    train = [e for e in entries if e["split"] == "train2017"][:11]
    keep = val + train[:10]
    for e in val + train:
        os.symlink(src / "images" / e["image"], imgs / e["image"])
    # train[10] is in the folder but not in the captions file: no caption
    (base / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in keep) + "\n")
    p = base / "small.db"
    run("init", p, "--model", model, check=True)
    run("add", p, "--images", imgs, "--captions", base / "captions.jsonl", "-q", check=True)
    return p


def test_json_has_every_figure(db):
    r = run("eval", db, "--json", "--nlist", "4", "--nprobe", "1,2,4,8", check=True)
    j = json.loads(r.stdout)
    assert j["images"] == 31 and j["captions"] == 150
    assert j["images_without_captions"] == 1
    assert j["metric"] == "cosine" and j["split"] == "all" and j["vector_set"] == "base"
    for d, gallery in (("t2i", 31), ("i2t", 150)):
        assert set(j[d]) >= {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
        assert 0 <= j[d]["R@1"] <= j[d]["R@5"] <= j[d]["R@10"] <= 1
        assert 1 <= j[d]["median_rank"] <= gallery and 1 <= j[d]["mean_rank"] <= gallery
        for m in ("cosine", "dot", "l2"):
            c = j["hit_rate"][d][m]
            assert [k for k, _ in c] == list(range(1, min(1000, gallery) + 1))
            rates = [v for _, v in c]
            assert rates == sorted(rates) and rates[-1] == 1.0  # the whole gallery
        assert j["hit_rate"][d]["cosine"][0][1] == j[d]["R@1"]
    assert j["random"][0] == [1, pytest.approx(1 / 31)] and j["random"][-1][1] == pytest.approx(1.0)
    # one vector set today, as a list
    assert [s["name"] for s in j["sets"]] == ["base"] and j["sets"][0]["t2i"] == j["t2i"]
    ic = j["index_comparison"]
    assert ic["measured"] and ic["nlist"] == 4 and ic["k"] == 10
    kinds = [(r["index"], r["nprobe"]) for r in ic["rows"]]
    assert kinds[0] == ("exact", 0)
    assert [n for k, n in kinds if k == "ivf"] == [1, 2, 4]  # 8 > nlist is left out
    assert [n for k, n in kinds if k == "faiss"] == [1, 2, 4]
    for row in ic["rows"]:
        assert 0 <= row["recall"] <= 1 and row["qps"] > 0
    # every list probed: exact answers
    assert [r["recall"] for r in ic["rows"] if r["nprobe"] == 4] == [1.0, 1.0]
    assert len(j["samples"]["i2t"]) == 5 and len(j["samples"]["t2i"]) == 5
    s = j["samples"]["i2t"][0]
    assert s["image"].endswith(".jpg") and len(s["truth"]) == 5 and len(s["top"]) == 5
    assert j["gpu"]["measured"] is False and "not measured" in j["gpu"]["note"]
    assert len(j["ranks"]["t2i"]) == 150 and sum(r == 0 for _, r in j["ranks"]["i2t"]) == 1


def test_split_where_and_text(db):
    a = json.loads(run("eval", db, "--split", "val2017", "--json", "--no-index", check=True).stdout)
    b = json.loads(run("eval", db, "--where", "split=val2017", "--json", "--no-index",
                       check=True).stdout)
    assert a["images"] == b["images"] == 20 and a["captions"] == 100
    assert a["t2i"] == b["t2i"] and a["index_comparison"] == {"measured": False}
    t = run("eval", db, "--split", "val2017", "-k", "1,3", "--no-index", check=True).stdout
    assert "20 images, 100 captions" in t and "R@3" in t and "text->image" in t
    first = json.loads(run("eval", db, "--pairs", "first", "--json", "--no-index",
                           check=True).stdout)
    assert first["captions"] == 30 and first["pairs"] == "first"


def test_plots_and_html(db, tmp_path):
    plots, html = tmp_path / "plots", tmp_path / "report.html"
    run("eval", db, "--plots", plots, "--plot-format", "both", "--html", html, "--nlist", "4",
        check=True)
    for name in ("hit_rate_t2i", "hit_rate_i2t", "index_speed", "models"):
        png = (plots / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert b"<svg" in (plots / f"{name}.svg").read_bytes()[:2000]
    h = html.read_text()
    assert h.count("data:image/png;base64,") == 4
    # thumbnails: 5 sampled images; 5 captions x (their image + the top 5)
    assert h.count("data:image/jpeg;base64,") == 5 + 5 * 6
    assert "src=\"http" not in h and "href=\"http" not in h  # opens with no network
    assert "R@1" in h and "not measured" in h


def test_bad_input(db, model, tmp_path, shared):
    p = run("eval", db, "--split", "nope")
    one_line_failure(p, "eval", "no images in the split", "split=nope")
    p = run("eval", db, "--split", "val2017", "-k", "1,21")
    one_line_failure(p, "eval", "k 21 is larger than the gallery", "20 images")
    p = run("eval", db, "--set", "finetuned")
    one_line_failure(p, "eval", "no vector set 'finetuned'", "base")
    texts = tmp_path / "t.txt"
    texts.write_text("a cat\na dog\n")
    nocap = tmp_path / "texts.db"
    run("init", nocap, "--model", model, check=True)
    run("add", nocap, "--texts", texts, "-q", check=True)
    one_line_failure(run("eval", nocap), "eval", "no images in the split")
    # images but no captions
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in sorted((shared / "data" / "coco-subset" / "images").glob("*.jpg"))[:2]:
        os.symlink(f, imgs / f.name)
    only = tmp_path / "images-only.db"
    run("init", only, "--model", model, check=True)
    run("add", only, "--images", imgs, "-q", check=True)
    one_line_failure(run("eval", only), "eval", "no captions linked to the 2 images")
    one_line_failure(run("eval", tmp_path / "missing.db"), "eval")
    for bad in (["-k", "0"], ["-k", "1,x"], ["--pairs", "some"], ["--metric", "hamming"],
                ["--nprobe", "-1"], ["--plot-format", "gif"], ["--bogus"]):
        p = run("eval", db, *bad)
        assert p.returncode == 2, (bad, p.stderr)
        assert p.stderr.startswith("clipdb eval: ")
    p = run("eval", db, "--plots", "/proc/no/such/dir", "--no-index")
    one_line_failure(p, "eval", "cannot create")


def test_help_teaches():
    h = run("eval", "--help", check=True).stdout
    for needle in ("tie", "R@1", "--pairs first", "random", "nprobe", "--html", "not measured"):
        assert needle in h
