"""Embeddings of `clipdb embed` against an independent PyTorch CLIP (tools/ref_clip.py).

Models are seeded random weights from tools/gen_model.py (no pretrained CLIP
weights exist offline), in both key conventions (OpenAI, Hugging Face) and
dtypes F32/F16; inputs are real photos (COCO JPEG, Flickr8k JPEG, a PNG made
from a COCO photo) and real captions. The minimum cosines are printed
(pytest -s), and asserted against the README's claims (COS_FLOOR, REL_*).
Full-size ViT-B/32 runs too (a few inputs, about 10 s).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run

sys.path.insert(0, str(ROOT / "tools"))
import ref_clip  # noqa: E402

GEN = ROOT / "tools" / "gen_model.py"
PY = "/usr/bin/python3"


def cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    out = {}
    specs = [("tiny", "openai", "F32"), ("tiny", "hf", "F32"), ("small", "openai", "F32"),
             ("small", "hf", "F32"), ("small", "openai", "F16"),
             ("b32", "openai", "F32"), ("b32", "hf", "F32"),
             ("rn-tiny", "openai", "F32"), ("rn-small", "openai", "F32"),
             ("rn-small", "openai", "F16"), ("rn50", "openai", "F32")]
    for size, keys, dtype in specs:
        d = base / f"{size}-{keys}-{dtype}"
        subprocess.run([PY, str(GEN), str(d), "--size", size, "--keys", keys, "--dtype", dtype,
                        "--seed", "11"], check=True, capture_output=True)
        out[(size, keys, dtype)] = d
    return out


@pytest.fixture(scope="module")
def inputs(shared, tmp_path_factory):
    from PIL import Image
    coco = sorted((shared / "data" / "coco-subset" / "images").glob("*.jpg"))[:4]
    flickr = sorted((shared / "data" / "flickr8k" / "images").glob("*.jpg"))[:3]
    png = tmp_path_factory.mktemp("png") / "coco.png"
    with Image.open(coco[3]) as im:  # a photo not among the JPEG inputs: all inputs differ
        im.convert("RGB").save(png)
    images = [str(p) for p in coco[:3] + flickr] + [str(png)]
    caps = []
    with open(shared / "data" / "coco-subset" / "captions.jsonl") as f:
        for line in f:
            caps += json.loads(line)["captions"][:2]
            if len(caps) >= 6:
                break
    caps += ["a photo of a cat", "A dog!", "x" * 3 + " is a short one",
             " ".join(["word"] * 70)]  # 72 tokens: near the context limit
    return images, caps


def c_embed(model_dir, texts=(), images=()):
    args = ["embed", "--model", model_dir, "--json"]
    for t in texts:
        args += ["--text", t]
    for p in images:
        args += ["--image", p]
    p = run(*args)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert len(rows) == len(texts) + len(images)
    return np.array([r["embedding"] for r in rows], np.float32)


_ref_cache = {}


def ref_model(d):
    if d not in _ref_cache:
        _ref_cache[d] = ref_clip.load_model(d)
    return _ref_cache[d]


# What README's "Faithfulness" claims, with a small margin over the measured
# worst cases (F32: relative error 8.9e-7 at most over every model, input and
# key convention here; F16 weights: 9.7e-4, cosine 0.99999954): the cosine
# prints as 1.000000 (>= 0.9999995) and the relative error ||c - r|| / ||r||
# stays under these bounds.
COS_FLOOR = 0.9999995
REL_F32 = 1.2e-6
REL_F16 = 1.2e-3


def compare(c, r, rel_max, what, n, note=""):
    """Asserts clipdb's vectors c match the reference r row by row: cosine >=
    COS_FLOOR and relative error <= rel_max, and, since random weights make
    different inputs' vectors close to each other, also that every matched
    pair is closer than any two different inputs' reference vectors (so a
    wrong input order, or vectors that ignore the input, cannot pass)."""
    m = min(cos(a, b) for a, b in zip(c, r))
    rel = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(c, r))
    others = [cos(r[i], r[j]) for i in range(len(r)) for j in range(len(r)) if i != j]
    print(f"\n{what}: min cosine {m:.9f}, max relative error {rel:.2e} over {n}{note}; "
          f"different inputs: max cosine {max(others):.6f}")
    assert m >= COS_FLOOR, f"{what}: min cosine {m:.9f} < {COS_FLOOR}"
    assert rel <= rel_max, f"{what}: max relative error {rel:.3e} > {rel_max:.1e}"
    assert m > max(others)


def check_images(models, inputs, key, rel_max, ref_key=None):
    import torch
    torch.set_num_threads(2)
    images = inputs[0]
    c = c_embed(models[key], images=images)
    r = ref_clip.encode_images(ref_model(models[ref_key or key]), images)
    compare(c, r, rel_max, f"{key} images vs torch {ref_key or key}", len(images))


def check_texts(models, inputs, key, rel_max, ref_key=None):
    import torch
    torch.set_num_threads(2)
    caps = inputs[1]
    d = models[key]
    c = c_embed(d, texts=caps)
    r = ref_clip.encode_ids(ref_model(models[ref_key or key]), ref_clip.tokenize(caps, d))
    compare(c, r, rel_max, f"{key} texts vs torch {ref_key or key}", len(caps),
            f" (token ids from {ref_clip.token_source()})")


F32 = [("tiny", "openai", "F32"), ("tiny", "hf", "F32"), ("small", "openai", "F32"),
       ("small", "hf", "F32")]
F16 = (("small", "openai", "F16"), ("small", "openai", "F32"))


@pytest.mark.parametrize("key", F32)
def test_images_f32_match_torch(models, inputs, key):
    check_images(models, inputs, key, REL_F32)


@pytest.mark.parametrize("key", F32)
def test_texts_f32_match_torch(models, inputs, key):
    check_texts(models, inputs, key, REL_F32)


def test_images_f16_weights_match_f32_torch(models, inputs):
    check_images(models, inputs, F16[0], REL_F16, ref_key=F16[1])


def test_texts_f16_weights_match_f32_torch(models, inputs):
    check_texts(models, inputs, F16[0], REL_F16, ref_key=F16[1])


def test_openai_and_hf_files_give_the_same_vectors(models, inputs):
    images, caps = inputs
    a = c_embed(models[("small", "openai", "F32")], images=images[:3])
    b = c_embed(models[("small", "hf", "F32")], images=images[:3])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()))
    a = c_embed(models[("small", "openai", "F32")], texts=caps[:4])
    b = c_embed(models[("small", "hf", "F32")], texts=caps[:4])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()))


@pytest.mark.parametrize("keys", ["openai", "hf"])
def test_b32_matches_torch(models, inputs, keys):
    # Full-size ViT-B/32 (seeded random weights): a COCO JPEG, a Flickr8k JPEG,
    # the PNG, and captions including one of 72 tokens.
    images, caps = inputs
    few = ([images[0], images[3], images[-1]], caps[:2] + caps[-1:])
    key = ("b32", keys, "F32")
    check_images(models, few, key, REL_F32)
    check_texts(models, few, key, REL_F32)


# CLIP's ModifiedResNet image tower (OpenAI names; Hugging Face has none):
# convolutions, batch norm on its running statistics, the anti-aliased
# strides and the attention pool, against tools/ref_clip.py's torch module.
# The photos go in as PNG copies: clipdb decodes a JPEG whose shorter side
# is 3x the tower's input or more at a reduced DCT scale (close to, not bit
# for bit, PIL's full decode), which small towers would meet; as PNG both
# sides see the same pixels and the test measures the tower.
RN = [("rn-tiny", "openai", "F32"), ("rn-small", "openai", "F32")]


@pytest.fixture(scope="module")
def png_inputs(inputs, tmp_path_factory):
    from PIL import Image
    out = tmp_path_factory.mktemp("png-photos")
    images = []
    for i, p in enumerate(inputs[0]):
        images.append(str(out / f"{i}.png"))
        with Image.open(p) as im:
            im.convert("RGB").save(images[-1])
    return images, inputs[1]


@pytest.mark.parametrize("key", RN)
def test_resnet_images_f32_match_torch(models, png_inputs, key):
    check_images(models, png_inputs, key, REL_F32)


def test_resnet_images_f16_weights_match_f32_torch(models, png_inputs):
    check_images(models, png_inputs, ("rn-small", "openai", "F16"), REL_F16,
                 ref_key=("rn-small", "openai", "F32"))


def test_resnet_texts_match_torch(models, inputs):
    check_texts(models, inputs, ("rn-small", "openai", "F32"), REL_F32)


def test_rn50_matches_torch(models, png_inputs):
    # The published RN50's shapes (seeded random weights), 224 pixels: two
    # COCO photos, a Flickr8k photo.
    images, caps = png_inputs
    few = ([images[0], images[3], images[-1]], caps[:2])
    check_images(models, few, ("rn50", "openai", "F32"), REL_F32)
