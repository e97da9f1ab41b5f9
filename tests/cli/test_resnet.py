"""A ResNet CLIP (CLIP's ModifiedResNet image tower, the RN50 family) through
the real CLI: model info, a database built, searched and checked with it,
and the clear refusal of bf16 / int8 precision. Its vectors are checked
against torch in tests/ref/test_embed_reference.py; its training in
tests/cli/test_train.py and tests/ref/test_train_reference.py."""
import json

import pytest

from conftest import gen_model, one_line_failure, run


@pytest.fixture(scope="module")
def rn(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("rn") / "rn-tiny", "rn-tiny", "openai", "F16", 5)


def test_model_info_describes_the_resnet(rn):
    p = run("model", "info", rn, check=True)
    assert "image           128 x 128 pixels\n" in p.stdout
    assert ("vision tower    ResNet (CLIP's ModifiedResNet), width 16, bottlenecks 1-2-1-1, "
            "attention pool of 8 heads over a 4 x 4 grid") in p.stdout
    assert "identity        clip-rn-w16-1.2.1.1-s128-" in p.stdout
    info = json.loads(run("model", "info", rn, "--json", check=True).stdout)
    assert info["vision_kind"] == "resnet" and info["vision_stages"] == [1, 2, 1, 1]
    assert info["patch_size"] == 0 and info["image_size"] == 128 and info["embed_dim"] == 32
    assert info["weights_dtype"] == "F16"


def test_a_database_on_a_resnet_model(rn, coco, tmp_path):
    """init, add (photos and captions), search both ways, check: the model is
    usable everywhere a ViT is; an image finds itself first."""
    db = tmp_path / "rn.db"
    photos = tmp_path / "photos"
    photos.mkdir()
    names = sorted(p.name for p in (coco / "images").glob("*.jpg"))[:6]
    for n in names:
        (photos / n).symlink_to(coco / "images" / n)
    run("init", db, "--model", rn, check=True)
    run("add", db, "--images", photos, check=True)
    p = run("search", db, "--image", photos / names[2], "-k", 3, "--json", check=True)
    hits = json.loads(p.stdout)["results"]
    assert hits[0]["path"].endswith(names[2]), hits
    assert hits[0]["score"] > 0.9999
    p = run("search", db, "--text", "a dog on a sofa", "-k", 6, "--json", check=True)
    assert len(json.loads(p.stdout)["results"]) == 6
    run("check", db, check=True)


def test_resnet_refuses_bf16_and_int8(rn):
    for prec in ("bf16", "int8"):
        p = run("embed", "--model", rn, "--precision", prec, "--text", "a cat")
        one_line_failure(p, "embed", "a ResNet image tower runs in fp32 only")


def rewritten(src, dst, change):
    """A copy of the model directory src at dst whose tensors went through
    change({name: array}) (tools/gen_model.py's writer)."""
    import shutil
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import gen_model
    import ref_clip
    shutil.copytree(src, dst)
    w = ref_clip.read_safetensors(dst / "model.safetensors", ints=True)
    change(w)
    gen_model.write_safetensors(dst / "model.safetensors", list(w.items()), "F32")
    return dst


def test_bad_resnet_files_are_refused_with_the_tensor_named(rn, tmp_path):
    def negative_var(w):
        w["visual.layer2.1.bn2.running_var"][3] = -0.5

    def extra_downsample(w):  # layer2.1 keeps its shape: CLIP has no downsample there
        w["visual.layer2.1.downsample.0.weight"] = w["visual.layer2.0.downsample.0.weight"][:, :128]
    d = rewritten(rn, tmp_path / "negvar", negative_var)
    one_line_failure(run("model", "info", d), "model",
                     "tensor 'visual.layer2.1.bn2.running_var' has a negative or NaN entry (3)")
    d = rewritten(rn, tmp_path / "extra", extra_downsample)
    one_line_failure(run("model", "info", d), "model",
                     "unexpected tensor 'visual.layer2.1.downsample.0.weight'")
    d = rewritten(rn, tmp_path / "same", lambda w: None)  # the writer itself keeps it loadable
    run("model", "info", d, check=True)
