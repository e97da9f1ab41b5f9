"""The GPU backend (--device) through the real binary.

Everywhere: `--device cuda` without a usable CUDA device fails with one line
and exit 1, `--device auto` falls back to the CPU (identical output), and a
bad --device value is a usage error. With a device (bench/gpu_check.sh runs
these on a GPU machine; here they skip with a message): the GPU encoders
agree with the CPU fp32 path (cosine >= 0.9999 in fp32, >= 0.999 in bf16)
for the tiny and the full-size ViT-B/32 model, and GPU exact search returns
the CPU's ids (ties aside) on the COCO subset for all three metrics, both
targets, with and without filters."""
import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT, one_line_failure, run

GEN = ROOT / "tools" / "gen_model.py"
PY = "/usr/bin/python3"
TEXTS = ["a dog", "a photo of a cat on a red sofa", "two people riding bicycles down a "
         "narrow street next to a canal in the morning", "x", "a bus", "kitchen with a stove "
         "and a refrigerator", "a man holding a surfboard on the beach near the water"] * 3


def gen_model(d, size, seed):
    subprocess.run([PY, str(GEN), str(d), "--size", size, "--keys", "openai", "--dtype", "F32",
                    "--seed", str(seed)], check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("model"), "tiny", 1)


@pytest.fixture(scope="module")
def gpu(model):
    p = run("embed", "--model", model, "--device", "cuda", "--text", "probe")
    if p.returncode != 0:
        pytest.skip(f"no usable CUDA device here ({p.stderr.strip()}); the GPU comparisons "
                    "run in bench/gpu_check.sh on a GPU machine")
    return True


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Twelve seeded random JPEG/PNG images of assorted sizes."""
    from PIL import Image
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(12):
        w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        p = d / (f"im{i}.jpg" if i % 2 else f"im{i}.png")
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def embed(model, device, texts=(), images=(), precision="fp32"):
    args = ["embed", "--model", model, "--json", "--device", device, "--precision", precision]
    for t in texts:
        args += ["--text", t]
    for i in images:
        args += ["--image", i]
    r = run(*args, check=True)
    return np.array([json.loads(line)["embedding"] for line in r.stdout.splitlines()])


def cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_cuda_without_device_is_one_line(model, tmp_path):
    p = run("embed", "--model", model, "--device", "cuda", "--text", "a dog")
    if p.returncode == 0:
        pytest.skip("a CUDA device is present: this checks the machine without one")
    line = one_line_failure(p, "embed", "--device cuda")
    assert "no CUDA device" in line or "built without CUDA" in line
    db = tmp_path / "t.db"
    texts = tmp_path / "t.txt"
    texts.write_text("a dog\na cat\n")
    run("init", db, "--model", model, check=True)
    one_line_failure(run("add", db, "--texts", texts, "--device", "cuda"), "add", "--device cuda")
    run("add", db, "--texts", texts, check=True)
    one_line_failure(run("search", db, "--text", "a dog", "--device", "cuda"), "search",
                     "--device cuda")


def test_auto_falls_back_to_cpu(model, images):
    cpu = run("embed", "--model", model, "--json", "--text", "a dog", "--image", images[0],
              check=True)
    auto = run("embed", "--model", model, "--json", "--device", "auto", "--text", "a dog",
               "--image", images[0], check=True)
    probe = run("embed", "--model", model, "--device", "cuda", "--text", "probe")
    if probe.returncode != 0:
        assert auto.stdout == cpu.stdout  # the CPU path, bit for bit
    else:
        a = np.array([json.loads(x)["embedding"] for x in auto.stdout.splitlines()])
        c = np.array([json.loads(x)["embedding"] for x in cpu.stdout.splitlines()])
        assert cosines(a, c).min() >= 0.9999


@pytest.mark.parametrize("value", ["gpu", "cuda:int8", "", "CPU"])
def test_bad_device_value_is_usage_error(model, value):
    p = run("embed", "--model", model, "--device", value, "--text", "a dog")
    assert p.returncode == 2 and "--device is cpu, cuda or auto" in p.stderr


@pytest.mark.parametrize("size", ["tiny", "b32"])
def test_gpu_embeddings_match_cpu(gpu, tmp_path, model, images, size):
    m = model if size == "tiny" else gen_model(tmp_path / "b32", "b32", 3)
    ref = embed(m, "cpu", TEXTS, images)
    # the GPU encoders run in the model's precision (--precision)
    for precision, floor in (("fp32", 0.9999), ("bf16", 0.999)):
        got = embed(m, "cuda", TEXTS, images, precision)
        c = cosines(got, ref)
        assert c.min() >= floor, (size, precision, c.min())


def test_gpu_refuses_int8_encoders(gpu, model):
    p = run("embed", "--model", model, "--device", "cuda", "--precision", "int8", "--text", "a")
    line = one_line_failure(p, "embed", "GPU encoders run in fp32 or bf16")
    assert "int8" in line


@pytest.fixture(scope="module")
def coco(shared):
    d = shared / "data" / "coco-subset"
    if not (d / "images").is_dir():
        pytest.skip(f"{d} not found; skipping")
    return d


@pytest.fixture(scope="module")
def db(tmp_path_factory, model, coco):
    p = tmp_path_factory.mktemp("db") / "coco.db"
    run("init", p, "--model", model, check=True)
    run("add", p, "--images", coco / "images", "--captions", coco / "captions.jsonl", check=True)
    return p


def same_ids(a, b, metric, tol=1e-4):
    """Ranked lists agree: equal ids, or at that rank equal scores (a tie).
    L2 scores are compared squared: -sqrt of a clamped difference of norms
    magnifies rounding near 0 (an item's distance to itself) on both paths."""
    assert len(a) == len(b)
    f = (lambda s: s * s) if metric == "l2" else (lambda s: s)
    for x, y in zip(a, b):
        assert abs(f(x["score"]) - f(y["score"])) <= tol * (1 + abs(f(y["score"]))), (x, y)
        if x["id"] != y["id"]:
            assert any(abs(f(z["score"]) - f(x["score"])) <= tol * (1 + abs(f(x["score"])))
                       for z in b), (x, y)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("target", ["image", "text"])
def test_gpu_search_matches_cpu_on_coco(gpu, db, tmp_path, metric, target):
    q = tmp_path / "q.txt"
    q.write_text("\n".join(TEXTS[:7] + ["item:1", "item:5", "item:338"]) + "\n")
    for extra in ([], ["-k", "50", "--where", "split=val2017"], ["-k", "1"]):
        args = ["search", db, "--batch", q, "--json", "--metric", metric, "--target", target,
                *extra]
        cpu = json.loads(run(*args, check=True).stdout)["queries"]
        for device in ("cuda", "auto"):
            got = json.loads(run(*args, "--device", device, check=True).stdout)["queries"]
            for a, b in zip(got, cpu):
                same_ids(a["results"], b["results"], metric)


def test_gpu_add_matches_cpu_add(gpu, tmp_path, model, coco, db):
    p = tmp_path / "g.db"
    run("init", p, "--model", model, check=True)
    r = run("add", p, "--images", coco / "images", "--captions", coco / "captions.jsonl",
            "--device", "cuda", "--batch", "128", "--json", check=True)
    assert json.loads(r.stdout)["images_added"] == 338
    for t in ("a dog", "a red bus"):
        a = json.loads(run("search", p, "--text", t, "--json", check=True).stdout)["results"]
        b = json.loads(run("search", db, "--text", t, "--json", check=True).stdout)["results"]
        assert len({x["path"] for x in a} & {x["path"] for x in b}) >= 9
