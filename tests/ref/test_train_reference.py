"""The training engine (src/train) against an independent PyTorch reference.

Ours: build/tools/train_step (tools/train_step.c) runs the C engine on a
batch of real COCO photos and captions from ../shared. Reference:
tools/ref_train.py (torch autograd + torch.optim.AdamW, open_clip's recipe).
Generated seeded models (tools/gen_model.py), tiny and small, in both key
conventions (OpenAI and Hugging Face names), and the ResNet image towers
rn-tiny and rn-small (OpenAI names only; batches at their own image sizes,
128 and 160).

Checks, with the tolerances the issue states:
  * every tensor's gradient: relative error ||ours - ref|| / ||ref|| <= 1e-4.
    Exception, stated: the attention KEY biases (HF k_proj.bias) have a true
    gradient of exactly 0 (softmax is invariant to a shift of every score of a
    row, which is all a key bias does); both sides compute rounding noise
    there, so for them both norms must be < 1e-6 x the global gradient norm.
  * one AdamW step: torch.optim.AdamW applied to OUR gradient gives our
    weights to 1e-6 (every coordinate); against the full reference step the
    weights agree to 1e-6 wherever |grad| >= 1e-5 (below that Adam's first
    step g / (|g| + eps) turns rounding noise of the gradient into up to lr
    of movement, in both implementations alike, possibly in opposite
    directions; there the two are checked to differ by at most 2 lr).
  * 50 steps on the same batch from the same weights: the loss curves agree
    within 1e-3 relative.
  * exact micro-batching (open_clip accum_freq style) gives the full-batch
    gradient; --train proj / last:1 leave frozen tensors at zero gradient;
    global-norm clipping equals torch.nn.utils.clip_grad_norm_ + AdamW.

ResNet (test_resnet_*): BatchNorm in training mode, as torch's; the running
statistics are listed untrainable with gradient 0 and compared after step 1
(1e-5). The same tolerances, with two measured changes: the gradients are
compared with the reference corrected for ReLU flips (an input within
float32 error of 0 takes a different mask in two float32 computations,
which moves earlier gradients by 1e-3 to 1e-2; ref_train.relu_flip_fit),
and the loss curve is 20 steps at lr 2e-6 (at 1e-3 the float32 curve parts
from float64's by more than 100 %). test_resnet_reference_is_torch_...
checks the reference itself (BatchNorm by hand, finite differences) and
needs no C tool. Micro-batching is not compared for ResNet (batch
statistics are per micro-batch there, as in torch's accumulation).
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", str(ROOT / "build")))
TOOL = BUILD / "tools" / "train_step"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import gen_model  # noqa: E402

N_PAIRS = 8
LR = 1e-3
WD = 0.2


@pytest.fixture(scope="module")
def tool():
    assert TOOL.is_file(), f"{TOOL} is not built (make {TOOL.relative_to(ROOT)})"
    return TOOL


@pytest.fixture(scope="module")
def refmods():
    import torch
    torch.set_num_threads(2)
    import ref_clip
    import ref_train
    return ref_clip, ref_train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("train-models")
    return {(size, keys): gen_model(base / f"{size}-{keys}", size, keys, "F32", 7)
            for size in ("tiny", "small") for keys in ("openai", "hf")}


def coco_batch(shared, refmods, side, model, path):
    """Writes BATCH.bin: the first N_PAIRS COCO photos (CLIP preprocessing at
    side x side) with their first captions (tokenized with model's
    tokenizer); returns path."""
    import json
    ref_clip, ref_train = refmods
    coco = shared / "data" / "coco-subset"
    rows = [json.loads(l) for l in open(coco / "captions.jsonl", encoding="utf-8")][:N_PAIRS]
    px = np.stack([ref_clip.load_image(coco / "images" / r["image"], side).numpy() for r in rows])
    ids = ref_clip.tokenize([r["captions"][0] for r in rows], model)
    ref_train.write_batch(path, px, ids)
    return path


@pytest.fixture(scope="module")
def batch(shared, refmods, models, tmp_path_factory):
    """8 COCO photos (CLIP preprocessing) with their first captions."""
    return coco_batch(shared, refmods, 224, models[("tiny", "openai")],
                      tmp_path_factory.mktemp("train-batch") / "batch.bin")


def ours(tool, model, batch, out, *args):
    out.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([str(tool), str(model), str(batch), str(out), *map(str, args)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    grads = np.fromfile(out / "grads.f32", "<f4")
    params = np.fromfile(out / "params1.f32", "<f4")
    tensors = []
    for line in (out / "tensors.tsv").read_text().splitlines():
        name, _, shape, off, n, trainable = line.split("\t")
        shape = tuple(int(x) for x in shape.split(",")) if shape else ()
        tensors.append((name, shape, int(off), int(n), trainable == "1"))
    losses = np.loadtxt(out / "losses.txt", ndmin=1)

    def view(flat, off, n, shape):
        return flat[off:off + n].reshape(shape)
    g = {t[0]: view(grads, t[2], t[3], t[1]) for t in tensors}
    p1 = {t[0]: view(params, t[2], t[3], t[1]) for t in tensors}
    return g, p1, losses, {t[0]: t[4] for t in tensors}


def is_key_bias(name):
    return name.endswith("k_proj.bias")


def check_gradients(g, rg):
    """Every tensor's gradient g[name] against the reference rg[name]:
    relative error <= 1e-4; the key biases (true gradient 0) both below 1e-6
    of the global norm. Returns (worst relative error, its tensor)."""
    gnorm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in rg.values()))
    worst = (0.0, "")
    for name, ref in rg.items():
        ref = ref.reshape(g[name].shape)
        if is_key_bias(name):
            assert np.linalg.norm(ref) < 1e-6 * gnorm and np.linalg.norm(g[name]) < 1e-6 * gnorm, name
            continue
        rel = float(np.linalg.norm((g[name] - ref).ravel())) / float(np.linalg.norm(ref.ravel()))
        worst = max(worst, (rel, name))
        assert rel <= 1e-4, f"{name}: gradient relative error {rel:.3g}"
    return worst


def check_adamw_step(ref_train, model, g, p1, rp1, rg):
    """One AdamW step (LR, WD) from the model file: torch.optim.AdamW on OUR
    gradient g gives our weights p1 to 1e-6 (every coordinate); against the
    reference step rp1 (made with gradient rg) p1 agrees to 1e-6 wherever
    |rg| >= 1e-5, elsewhere within 2 lr. Returns AdamW on our gradient."""
    tp1 = ref_train.adamw_on(model, g, lr=LR, wd=WD)
    for name, ref in tp1.items():
        d = np.abs(p1[name] - ref.reshape(p1[name].shape)).max()
        assert d <= 1e-6, f"{name}: AdamW on our gradient differs by {d:.3g}"
    for name, ref in rp1.items():
        ref = ref.reshape(p1[name].shape)
        well = np.abs(rg[name].reshape(ref.shape)) >= 1e-5
        d = np.abs(p1[name] - ref)
        assert (d[well] <= 1e-6).all(), f"{name}: weights after one step differ by {d[well].max():.3g}"
        # elsewhere each side moves by at most lr (|m_hat| / (sqrt(v_hat) + eps) < 1)
        assert (d <= 2 * LR * 1.0001 + 1e-6).all(), f"{name}: differ by {d.max():.3g} > 2 lr"
    return tp1


CASES = [("tiny", "openai"), ("tiny", "hf"), ("small", "openai"), ("small", "hf")]


@pytest.mark.parametrize("size,keys", CASES)
def test_gradients_and_one_adamw_step(tool, refmods, models, batch, tmp_path, size, keys):
    _, ref_train = refmods
    model = models[(size, keys)]
    g, p1, losses, _ = ours(tool, model, batch, tmp_path / "c", "--lr", LR, "--wd", WD)
    px, ids, _ = ref_train.read_batch(batch)
    rg, rp1, rlosses = ref_train.run(model, px, ids, steps=1, lr=LR, wd=WD)
    assert set(g) == set(rg), set(g) ^ set(rg)
    assert abs(losses[0] - rlosses[0]) <= 1e-5 * abs(rlosses[0]), (losses[0], rlosses[0])
    worst = check_gradients(g, rg)
    print(f"{size}/{keys}: worst gradient relative error {worst[0]:.3g} ({worst[1]})")

    check_adamw_step(ref_train, model, g, p1, rp1, rg)


@pytest.mark.parametrize("size,keys", [("tiny", "openai"), ("small", "hf")])
def test_fifty_steps_same_loss_curve(tool, refmods, models, batch, tmp_path, size, keys):
    _, ref_train = refmods
    model = models[(size, keys)]
    _, _, losses, _ = ours(tool, model, batch, tmp_path / "c", "--steps", 50, "--lr", 1e-4,
                           "--wd", WD)
    px, ids, _ = ref_train.read_batch(batch)
    _, _, rlosses = ref_train.run(model, px, ids, steps=50, lr=1e-4, wd=WD)
    assert len(losses) == 50
    rel = np.abs(losses - rlosses) / np.abs(rlosses)
    print(f"{size}/{keys}: loss {rlosses[0]:.4f} -> {rlosses[-1]:.5f}, "
          f"max relative difference {rel.max():.3g}")
    assert rel.max() <= 1e-3, (losses, rlosses)
    assert rlosses[-1] < 0.5 * rlosses[0]  # the run actually trains


def test_micro_batches_give_the_full_batch_gradient(tool, models, batch, tmp_path):
    model = models[("tiny", "hf")]
    g, _, loss, _ = ours(tool, model, batch, tmp_path / "full", "--lr", LR)
    gm, _, lossm, _ = ours(tool, model, batch, tmp_path / "micro", "--lr", LR, "--micro", 3)
    assert abs(loss[0] - lossm[0]) <= 1e-6 * abs(loss[0])
    for name in g:
        if is_key_bias(name):
            continue
        rel = np.linalg.norm(g[name] - gm[name]) / np.linalg.norm(g[name])
        assert rel <= 1e-5, f"{name}: micro-batched gradient differs, {rel:.3g}"


@pytest.mark.parametrize("what", ["proj", "last:1"])
def test_frozen_tensors_get_no_gradient(tool, models, batch, tmp_path, what):
    model = models[("small", "openai")]
    g, _, _, _ = ours(tool, model, batch, tmp_path / "all", "--lr", LR)
    gf, p1, _, trainable = ours(tool, model, batch, tmp_path / "f", "--lr", LR, "--train", what)
    from ref_clip import read_safetensors
    w0 = read_safetensors(model / "model.safetensors")
    n_trained = 0
    for name, tr in trainable.items():
        if not tr:
            assert not gf[name].any(), f"{name} is frozen but has a gradient"
            if name != "logit_scale":
                assert np.array_equal(p1[name], w0[name].reshape(p1[name].shape)), name
            continue
        n_trained += 1
        rel = np.linalg.norm(gf[name] - g[name]) / max(np.linalg.norm(g[name]), 1e-30)
        assert rel <= 1e-5, f"{name}: {rel:.3g}"
    if what == "proj":
        assert sorted(n for n, tr in trainable.items() if tr) == \
            ["logit_scale", "text_projection", "visual.proj"]
    else:  # last block of each tower (16 tensors each in OpenAI names... 12) + final ln + proj
        assert trainable["visual.transformer.resblocks.2.mlp.c_fc.weight"]
        assert not trainable["visual.transformer.resblocks.1.mlp.c_fc.weight"]
        assert trainable["ln_final.weight"] and not trainable["token_embedding.weight"]
        assert n_trained == 2 * (12 + 3) + 1


@pytest.mark.parametrize("size,keys", [("tiny", "openai"), ("small", "hf")])
def test_label_smoothing_as_torch(tool, refmods, models, batch, tmp_path, size, keys):
    """--label-smoothing: the loss and every gradient as torch's
    cross_entropy(label_smoothing=0.1) both ways, to the same tolerance as the
    plain loss; and the smoothing is not a no-op (the loss moves)."""
    _, ref_train = refmods
    model = models[(size, keys)]
    g, _, losses, _ = ours(tool, model, batch, tmp_path / "c", "--lr", LR, "--wd", WD,
                           "--smooth", 0.1)
    _, _, plain = ours(tool, model, batch, tmp_path / "p", "--lr", LR, "--wd", WD)[:3]
    px, ids, _ = ref_train.read_batch(batch)
    rg, _, rlosses = ref_train.run(model, px, ids, steps=1, lr=LR, wd=WD, smoothing=0.1)
    assert abs(losses[0] - rlosses[0]) <= 1e-5 * abs(rlosses[0]), (losses[0], rlosses[0])
    assert abs(losses[0] - plain[0]) > 1e-3, (losses[0], plain[0])
    check_gradients(g, rg)


@pytest.mark.parametrize("size,keys,micro", [("tiny", "openai", 0), ("small", "hf", 3)])
def test_patch_dropout_as_torch(tool, refmods, models, batch, tmp_path, size, keys, micro):
    """Patch dropout (cdb_trainer_set_patches, clipdb train --patch-drop): each
    image runs on its class token and a random half of its patches; the loss,
    every gradient (micro-batched or not; relative error <= 1e-4) and 20 steps
    of loss curve (1e-3 relative) as open_clip's PatchDropout in torch. It is not a no-op (the loss moves), and
    the position embeddings of patches no image kept get no gradient."""
    _, ref_train = refmods
    model = models[(size, keys)]
    px, ids, _ = ref_train.read_batch(batch)
    grid = 224 // 32
    npatch = grid * grid
    nkeep = npatch // 2
    rng = np.random.default_rng(5)
    # patches 0-3 are kept by no image (their position embeddings get no gradient)
    keep = np.stack([np.sort(rng.choice(np.arange(4, npatch), nkeep, replace=False))
                     for _ in range(len(px))]).astype(np.int32)
    kpath = tmp_path / "keep.i32"
    keep.astype("<i4").tofile(kpath)
    # lr 2e-5: at 1e-4 the small model's curve with dropped patches jumps
    # (0.6 -> 0.27 -> 0.41) and both sides' rounding, equal to 6e-5 at step 1,
    # grows to 1e-2 by step 10 (measured); at 2e-5 the curve falls smoothly
    args = ["--lr", 2e-5, "--wd", WD, "--keep", kpath, "--nkeep", nkeep, "--steps", 20]
    if micro:
        args += ["--micro", micro]
    g, _, losses, _ = ours(tool, model, batch, tmp_path / "c", *args)
    plain = ours(tool, model, batch, tmp_path / "p", "--lr", LR, "--wd", WD)[2]
    rg, _, rlosses = ref_train.run(model, px, ids, steps=20, lr=2e-5, wd=WD, keep=keep)
    assert abs(losses[0] - rlosses[0]) <= 1e-5 * abs(rlosses[0]), (losses[0], rlosses[0])
    assert abs(losses[0] - plain[0]) > 1e-4, (losses[0], plain[0])
    check_gradients(g, rg)
    pos = [n for n in g if n.endswith("positional_embedding") and "visual" in n
           or n.endswith("position_embedding.weight") and "vision" in n]
    assert len(pos) == 1, list(g)
    never = sorted(set(range(npatch)) - set(keep.ravel().tolist()))
    assert never[:4] == [0, 1, 2, 3], never
    gp = g[pos[0]].reshape(npatch + 1, -1)
    assert not gp[[1 + p for p in never]].any()
    assert np.abs(gp[[1 + p for p in keep[0]]]).max() > 0
    rel_curve = np.abs(losses - rlosses) / np.abs(rlosses)
    assert rel_curve.max() <= 1e-3, rel_curve
    assert rlosses[-1] < 0.5 * rlosses[0]  # the run actually trains


@pytest.mark.parametrize("size,keys,micro", [("tiny", "openai", 0), ("small", "hf", 3)])
def test_several_captions_per_image_as_torch(tool, refmods, models, shared, tmp_path, size,
                                             keys, micro):
    """K captions per image (cdb_train_opts.texts_per_image, clipdb train
    --captions-per-image): 8 COCO photos, each with its first 3 captions; the
    loss is the mean over the 3 of the symmetric loss of the 8 images against
    one caption each. The loss, every gradient (micro-batched or not; relative
    error <= 1e-4), one AdamW step and 20 steps of loss curve (1e-3 relative)
    as torch autograd on that loss; and it is not the one-caption loss."""
    import json
    ref_clip, ref_train = refmods
    model = models[(size, keys)]
    K = 3
    coco = shared / "data" / "coco-subset"
    rows = [json.loads(l) for l in open(coco / "captions.jsonl", encoding="utf-8")][:N_PAIRS]
    px = np.stack([ref_clip.load_image(coco / "images" / r["image"], 224).numpy() for r in rows])
    ids = ref_clip.tokenize([r["captions"][k] for k in range(K) for r in rows], model)
    path = tmp_path / "batch3.bin"
    ref_train.write_batch(path, np.concatenate([px] * K), ids)  # rows past 8: not read
    _, rids, _ = ref_train.read_batch(path)
    args = ["--lr", LR, "--wd", WD, "--texts", K]
    if micro:
        args += ["--micro", micro]
    g, p1, losses, _ = ours(tool, model, path, tmp_path / "c", *args)
    rg, rp1, rlosses = ref_train.run(model, px, rids, steps=1, lr=LR, wd=WD)
    assert abs(losses[0] - rlosses[0]) <= 1e-5 * abs(rlosses[0]), (losses[0], rlosses[0])
    one, _, one_loss = ref_train.run(model, px, rids[:N_PAIRS], steps=1, lr=LR, wd=WD)
    assert abs(one_loss[0] - rlosses[0]) > 1e-3, (one_loss[0], rlosses[0])
    worst = check_gradients(g, rg)
    print(f"{size}/{keys} K={K} micro={micro}: worst gradient relative error "
          f"{worst[0]:.3g} ({worst[1]})")
    check_adamw_step(ref_train, model, g, p1, rp1, rg)
    _, _, losses = ours(tool, model, path, tmp_path / "c20", "--lr", 1e-4, "--wd", WD,
                        "--texts", K, "--steps", 20)[:3]
    _, _, rlosses = ref_train.run(model, px, rids, steps=20, lr=1e-4, wd=WD)
    rel = np.abs(losses - rlosses) / np.abs(rlosses)
    assert rel.max() <= 1e-3, (losses, rlosses)
    assert rlosses[-1] < 0.7 * rlosses[0]  # the run actually trains


def test_gradient_clipping_as_torch(tool, refmods, models, batch, tmp_path):
    """--clip: the global-norm clipping of torch.nn.utils.clip_grad_norm_ before
    AdamW. A small max norm makes the clipped gradient comparable to eps, so
    the step differs visibly from the unclipped one (the test can fail)."""
    _, ref_train = refmods
    model = models[("tiny", "openai")]
    g, p1, _, _ = ours(tool, model, batch, tmp_path / "c", "--lr", LR, "--clip", 1e-4)
    _, p1u, _, _ = ours(tool, model, batch, tmp_path / "u", "--lr", LR)
    tp1 = ref_train.adamw_on(model, g, lr=LR, wd=WD, clip=1e-4)
    moved = 0.0
    for name, ref in tp1.items():
        d = np.abs(p1[name] - ref.reshape(p1[name].shape)).max()
        assert d <= 1e-6, f"{name}: clipped AdamW step differs by {d:.3g}"
        moved = max(moved, float(np.abs(p1[name] - p1u[name]).max()))
    assert moved > 1e-5  # clipping changed the step


# ---- the ResNet image tower (CLIP's ModifiedResNet: rn-tiny, rn-small) ------------

RN_SIZES = ("rn-tiny", "rn-small")


def is_stat(name):
    """A BatchNorm running statistic: listed with trainable 0, gradient 0."""
    return name.endswith(".running_mean") or name.endswith(".running_var")


@pytest.fixture(scope="module")
def rn_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("train-rn-models")
    return {size: gen_model(base / size, size, "openai", "F32", 7) for size in RN_SIZES}


@pytest.fixture(scope="module")
def rn_batch(shared, refmods, rn_models, tmp_path_factory):
    """{size: BATCH.bin}: the photos and captions of `batch`, preprocessed at
    each ResNet model's own image size (rn-tiny 128, rn-small 160)."""
    from gen_model import RN_SIZES as GEN_RN
    base = tmp_path_factory.mktemp("train-rn-batch")
    return {size: coco_batch(shared, refmods, GEN_RN[size][2], rn_models[size], base / f"{size}.bin")
            for size in RN_SIZES}


def test_resnet_reference_is_torch_batchnorm_train_mode(refmods, rn_models, rn_batch):
    """The ResNet reference on its own (no C tool), rn-tiny: that it is what
    the contract says before anything is compared with it.
      * BatchNorm normalises with the batch's mean and biased variance over
        (N, H, W), eps 1e-5 (the stem's bn1 output against a float64 hand
        computation from the pixels);
      * params1's running statistics are ONE momentum-0.1 update with the
        UNBIASED variance, untouched by AdamW: 0.9 old + 0.1 batch, by hand
        for the stem's bn1 (n = 8 x 64 x 64) and for layer4.0.bn3, where n =
        8 x 4 x 4 = 128 makes n / (n - 1) visible (the biased variance must
        fail there); their gradients are 0;
      * the float64 gradient is the loss's derivative: central differences
        (float64) at the largest coordinate of three tensors across the
        tower, to 1e-5. h is 1e-9: the loss is only piecewise smooth (ReLU),
        and an input of layer3's output lies 7e-8 of its rms from 0, so at h
        1e-6 to 1e-8 the difference for the stem's conv1 crosses that kink
        and is off by 2e-4 to 1e-3 (measured; the attention pool, with no
        ReLU before it, agrees to 1e-8 there);
      * the float32 reference against the float64 one, through
        relu_flip_fit (how the C side is compared), on one thread: there
        torch's float32 rounds an input of layer3's output, 4e-7 of its rms
        from 0, to the other side and the early layers' gradients move by
        2.5e-3 (on two threads, whose sums are split otherwise, that input
        stays and the two agree to 6e-6 plainly); with that flip they agree
        to 5e-6. Flips are that much a matter of rounding."""
    import torch
    ref_clip, ref_train = refmods
    model = rn_models["rn-tiny"]
    px, ids, _ = ref_train.read_batch(rn_batch["rn-tiny"])
    rg, rp1, _ = ref_train.run(model, px, ids, steps=1, lr=LR, wd=WD)
    w0 = ref_clip.read_safetensors(model / "model.safetensors")

    def rel(a, b):
        b = np.asarray(b, np.float64).ravel()
        return float(np.linalg.norm(np.asarray(a, np.float64).ravel() - b) / np.linalg.norm(b))

    for name in rg:
        if is_stat(name):
            assert not rg[name].any(), name

    # a float32 forward of the same module, its BatchNorm inputs and outputs kept
    style, w_file = ref_train.file_style(model)
    m = ref_train.Trainable(w_file, float(w_file["logit_scale"]))
    seen = {}
    v = m.clip.visual
    for key, mod in (("bn1", v.bn1), ("l4bn3", v.layer4[0].bn3)):
        mod.register_forward_hook(lambda mod, i, o, key=key: seen.update({key: (i[0], o)}))
    m.loss(torch.from_numpy(px), torch.from_numpy(ids.astype(np.int64)))

    # the stem's bn1 by hand: its input is conv1 (3x3, stride 2, pad 1) of the pixels
    y = torch.nn.functional.conv2d(torch.from_numpy(px).double(),
                                   torch.from_numpy(w0["visual.conv1.weight"]).double(),
                                   stride=2, padding=1)                    # (8, 8, 64, 64)
    assert rel(seen["bn1"][0].detach(), y) < 1e-6
    mean = y.mean(dim=(0, 2, 3))
    var_b = y.var(dim=(0, 2, 3), unbiased=False)
    c = (-1, 1, 1)
    want = ((y - mean.view(c)) / torch.sqrt(var_b.view(c) + 1e-5)
            * torch.from_numpy(w0["visual.bn1.weight"]).double().view(c)
            + torch.from_numpy(w0["visual.bn1.bias"]).double().view(c))
    d = float((seen["bn1"][1].detach().double() - want).abs().max())
    assert d < 1e-5, f"bn1 output differs from batch-statistics normalisation by {d:.3g}"
    var_u = y.var(dim=(0, 2, 3), unbiased=True)
    for stat, batch_value in (("running_mean", mean), ("running_var", var_u)):
        name = f"visual.bn1.{stat}"
        r = rel(rp1[name], 0.9 * w0[name] + 0.1 * batch_value.numpy())
        assert r < 1e-6, f"{name} after one step: relative error {r:.3g}"

    # layer4.0.bn3: n = 128, so the unbiased variance differs from the biased by 0.8 %
    x = seen["l4bn3"][0].detach().double()                                  # (8, 512, 4, 4)
    assert x.numel() // x.shape[1] == 128
    name = "visual.layer4.0.bn3.running_var"
    unbiased = rel(rp1[name], 0.9 * w0[name] + 0.1 * x.var(dim=(0, 2, 3), unbiased=True).numpy())
    biased = rel(rp1[name], 0.9 * w0[name] + 0.1 * x.var(dim=(0, 2, 3), unbiased=False).numpy())
    print(f"layer4.0.bn3.running_var: unbiased {unbiased:.2g}, biased {biased:.2g}")
    assert unbiased < 1e-6 and biased > 1e-5, (unbiased, biased)
    name = "visual.layer4.0.bn3.running_mean"
    assert rel(rp1[name], 0.9 * w0[name] + 0.1 * x.mean(dim=(0, 2, 3)).numpy()) < 1e-6

    # float64: the autograd gradient against central differences
    m64 = ref_train.Trainable(w_file, float(w_file["logit_scale"])).double()
    px64, tid = torch.from_numpy(px).double(), torch.from_numpy(ids.astype(np.int64))
    m64.loss(px64, tid).backward()
    named = m64.named()
    g64 = {k: p.grad.numpy().copy() for k, p in named.items()}
    h = 1e-9
    for name in ("visual.conv1.weight", "visual.layer2.0.bn1.weight",
                 "visual.attnpool.v_proj.weight"):
        p = named[name]
        i = int(np.abs(g64[name]).argmax())
        with torch.no_grad():
            flat = p.view(-1)
            keep = float(flat[i])
            flat[i] = keep + h
            up = float(m64.loss(px64, tid))
            flat[i] = keep - h
            down = float(m64.loss(px64, tid))
            flat[i] = keep
        fd = (up - down) / (2 * h)
        err = abs(fd - g64[name].flat[i]) / abs(g64[name].flat[i])
        print(f"{name}[{i}]: autograd {g64[name].flat[i]:.9g}, central difference {fd:.9g}, "
              f"relative {err:.2g}")
        assert err < 1e-5, (name, fd, g64[name].flat[i])

    # float32 reference vs float64, through the ReLU-flip correction (one thread)
    g64.update({k: np.zeros(b.shape) for k, b in m64.stats().items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rg1 = ref_train.run(model, px, ids, steps=1, lr=LR, wd=WD)[0]
        fixed, flips, tried = ref_train.relu_flip_fit(model, px, ids, g64)
    finally:
        torch.set_num_threads(threads)
    params = [k for k in rg if not is_stat(k)]
    plain = max(rel(rg1[k], g64[k]) for k in params if not is_key_bias(k))
    worst = check_gradients(g64, {k: fixed[k] for k in params})
    print(f"float32 reference vs float64: {plain:.3g} plain; {worst[0]:.3g} ({worst[1]}) "
          f"after {len(flips)} ReLU flip(s) ({tried} tried)")
    assert worst[0] <= 1e-5 and len(flips) <= 3, (worst, flips)


@pytest.mark.parametrize("size", RN_SIZES)
def test_resnet_gradients_and_one_adamw_step(tool, refmods, rn_models, rn_batch, tmp_path, size):
    """A ResNet image tower (rn-tiny, rn-small; OpenAI keys), BatchNorm in
    training mode (torch's nn.BatchNorm2d.train(): the batch's mean and
    biased variance over (N, H, W), eps 1e-5).
      * the tensors: every float tensor of the file but num_batches_tracked,
        by its OpenAI name; the running_mean / running_var trainable 0,
        gradient 0; every other tensor trainable;
      * the loss to 1e-5; every trainable tensor's gradient to 1e-4 relative
        (key bias as for the ViT), against the reference corrected for
        ReLU flips (ref_train.relu_flip_fit): a ReLU input within float32
        error of 0 takes mask 0 on one side and 1 on the other, and moves
        the gradient of every tensor before it by 1e-3 to 1e-2, in any two
        float32 computations (torch against itself on 1 and 2 threads);
        the fit adds such flips, whole, where our gradient made them;
      * AdamW: torch.optim.AdamW on OUR gradient gives our weights to 1e-6
        (every coordinate); against AdamW on the corrected reference
        gradient the weights agree as in the ViT test (1e-6 where |grad| >=
        1e-5, else within 2 lr);
      * the running statistics after step 1 (one update in the forward,
        momentum 0.1, unbiased variance; AdamW leaves them) to 1e-5 relative."""
    _, ref_train = refmods
    model, batch = rn_models[size], rn_batch[size]
    g, p1, losses, trainable = ours(tool, model, batch, tmp_path / "c", "--lr", LR, "--wd", WD)
    px, ids, _ = ref_train.read_batch(batch)
    rg, rp1, rlosses = ref_train.run(model, px, ids, steps=1, lr=LR, wd=WD)
    assert set(g) == set(rg), set(g) ^ set(rg)
    stats = sorted(n for n in rg if is_stat(n))
    assert stats and not any(trainable[n] for n in stats), "running statistics: trainable 0"
    assert all(trainable[n] for n in rg if not is_stat(n))
    for name in stats:
        assert not g[name].any(), f"{name}: a running statistic has a gradient"
    assert abs(losses[0] - rlosses[0]) <= 1e-5 * abs(rlosses[0]), (losses[0], rlosses[0])

    fixed, flips, tried = ref_train.relu_flip_fit(model, px, ids, g)
    params = {n: fixed[n] for n in rg if not is_stat(n)}
    plain = max((float(np.linalg.norm(g[n] - rg[n].reshape(g[n].shape)) / np.linalg.norm(rg[n])), n)
                for n in params if not is_key_bias(n))
    print(f"{size}: plain worst gradient relative error {plain[0]:.3g} ({plain[1]}); "
          f"{len(flips)} ReLU flip(s) of {tried} tried: {flips}")
    worst = check_gradients(g, params)
    print(f"{size}: worst gradient relative error {worst[0]:.3g} ({worst[1]})")

    # the reference step: AdamW on the (flip-corrected) reference gradient
    fp1 = ref_train.adamw_on(model, fixed, lr=LR, wd=WD)
    tp1 = check_adamw_step(ref_train, model, g, p1, fp1, params)
    assert set(tp1) == set(params)
    # the running statistics: one momentum update in step 1's forward
    for name in stats:
        ref = rp1[name].reshape(p1[name].shape)
        rel = float(np.linalg.norm(p1[name] - ref) / np.linalg.norm(ref))
        assert rel <= 1e-5, f"{name} after one step: relative error {rel:.3g}"


@pytest.mark.parametrize("size", RN_SIZES)
def test_resnet_twenty_steps_same_loss_curve(tool, refmods, rn_models, rn_batch, tmp_path, size):
    """20 steps on the same batch from the same weights: the loss curves agree
    within 1e-3 relative, and the run trains (the loss halves).

    lr 2e-6, measured: the reference in float32 against itself in float64
    parts by more than 100 % by step 14 at lr 1e-3 (rn-tiny's loss falls
    12.7 -> 0.01, and Adam's first steps of ~lr per coordinate plus the ReLU
    flips of each step amplify rounding), by 1e-2 at 2e-5 (the patch-dropout
    test's lr) on both sizes, by 3.5e-5 (rn-tiny) and 9.5e-4 (rn-small) at
    5e-6; at 2e-6 by at most 1.9e-5 and 7.5e-5 over the 20 steps while the
    loss still falls 12.7 -> 4.7 and 10.0 -> 0.42."""
    _, ref_train = refmods
    model, batch = rn_models[size], rn_batch[size]
    lr = 2e-6
    _, _, losses, _ = ours(tool, model, batch, tmp_path / "c", "--steps", 20, "--lr", lr,
                           "--wd", WD)
    px, ids, _ = ref_train.read_batch(batch)
    _, _, rlosses = ref_train.run(model, px, ids, steps=20, lr=lr, wd=WD)
    assert len(losses) == 20
    rel = np.abs(losses - rlosses) / np.abs(rlosses)
    print(f"{size}: loss {rlosses[0]:.4f} -> {rlosses[-1]:.5f}, max relative difference {rel.max():.3g}")
    assert rel.max() <= 1e-3, (losses, rlosses)
    assert rlosses[-1] < 0.5 * rlosses[0]  # the run actually trains


def test_resnet_train_proj_is_the_attention_pool_output(tool, rn_models, rn_batch, tmp_path):
    """--train proj on a ResNet: the image tower's projection is the
    attention pool's output projection, attnpool.c_proj (CLIP's
    ModifiedResNet has no separate proj), so exactly
    visual.attnpool.c_proj.weight / .bias, text_projection and logit_scale
    train, with the gradient they have in full training (1e-5: it does not
    pass through a ReLU, so no flips). The frozen tower still runs as in
    training, as torch does when the tensors merely stop requiring
    gradients (open_clip's locked image tower without freeze_bn_stats):
    BatchNorm on the batch's statistics, and its running statistics move
    exactly as in full training. Every other frozen tensor gets gradient 0
    and keeps its file value."""
    model, batch = rn_models["rn-tiny"], rn_batch["rn-tiny"]
    g, p1a, _, _ = ours(tool, model, batch, tmp_path / "all", "--lr", LR)
    gf, p1, _, trainable = ours(tool, model, batch, tmp_path / "f", "--lr", LR, "--train", "proj")
    from ref_clip import read_safetensors
    w0 = read_safetensors(model / "model.safetensors")
    assert sorted(n for n, tr in trainable.items() if tr) == \
        ["logit_scale", "text_projection", "visual.attnpool.c_proj.bias",
         "visual.attnpool.c_proj.weight"]
    for name, tr in trainable.items():
        if tr:
            rel = np.linalg.norm(gf[name] - g[name]) / max(np.linalg.norm(g[name]), 1e-30)
            assert rel <= 1e-5, f"{name}: {rel:.3g}"
            continue
        assert not gf[name].any(), f"{name} is frozen but has a gradient"
        if is_stat(name):
            rel = np.linalg.norm(p1[name] - p1a[name]) / np.linalg.norm(p1a[name])
            assert rel <= 1e-5, f"{name}: running statistic {rel:.3g} from full training's"
            assert not np.array_equal(p1[name], w0[name].reshape(p1[name].shape)), name
        elif name != "logit_scale":
            assert np.array_equal(p1[name], w0[name].reshape(p1[name].shape)), name
