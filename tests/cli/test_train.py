"""Black-box tests of `clipdb finetune` and `clipdb train` on tiny generated
models and a few photos of the shared COCO subset: the batch rule, bad input
(no captions, a split smaller than the batch, an existing --out, read-only
directories, NaN weights, a disk that fills while a checkpoint is written),
SIGKILL / SIGINT and resumption to the same weights, and the written model
loading and embedding like any other.

Mount-based tests (read-only and full file systems) mount a small tmpfs and
skip with a message when mounting is not allowed (not root, no CAP_SYS_ADMIN).
"""
import json
import math
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import time

import pytest

from conftest import BIN, gen_model, one_line_failure, run

ARCH = "vit:image=32,patch=16,width=64,layers=1;text:width=64,layers=1,context=16;embed=32"


@pytest.fixture(scope="module")
def photos(shared, tmp_path_factory):
    """16 photos of the COCO subset and a captions file: two captions each,
    split "train" for the first 8, "val" for the next 4, "small" for 4."""
    src = shared / "data" / "coco-subset" / "images"
    names = sorted(os.listdir(src))[:16]
    if len(names) < 16:
        pytest.skip(f"fewer than 16 images in {src}")
    d = tmp_path_factory.mktemp("photos")
    (d / "images").mkdir()
    with open(d / "captions.jsonl", "w") as f:
        for i, n in enumerate(names):
            shutil.copy(src / n, d / "images" / n)
            split = "train" if i < 8 else "val" if i < 12 else "small"
            f.write(json.dumps({"image": n, "split": split,
                                "captions": [f"photo {i} of a thing", f"a picture numbered {i}"]}) + "\n")
    return d


@pytest.fixture(scope="module")
def model(bpe_vocab, tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", "openai", "F32", 3)


@pytest.fixture(scope="module")
def db(photos, model, tmp_path_factory):
    p = tmp_path_factory.mktemp("db") / "p.db"
    run("init", p, "--model", model, check=True)
    run("add", p, "--images", photos / "images", "--captions", photos / "captions.jsonl", "-q",
        check=True)
    return p


def made(out):
    return json.loads((pathlib.Path(out) / "clipdb_made.json").read_text())


def weights(out):
    return (pathlib.Path(out) / "model.safetensors").read_bytes()


def embed(model_dir, photos):
    img = sorted((photos / "images").iterdir())[0]
    p = run("embed", "--model", model_dir, "--text", "a dog on a sofa", "--image", img, "--json",
            check=True)
    return [json.loads(l)["embedding"] for l in p.stdout.splitlines()]


# ---- the batch rule ----------------------------------------------------------------


def test_eight_images_batch_eight_is_one_step_per_epoch(db, model, tmp_path):
    out = tmp_path / "ft"
    p = run("finetune", db, "--model", model, "--out", out, "--split", "train", "--batch", 8,
            "--epochs", 3, "--lr", "1e-4", check=True)
    assert "8 pairs per epoch, 1 steps per epoch, 3 steps" in p.stderr
    assert made(out)["steps"] == 3 and made(out)["train_pairs"] == 8
    assert not (tmp_path / "ft.ckpt").exists()  # removed once the model is written


def test_remainder_is_dropped(db, model, tmp_path):
    # 16 captioned images, batch 6: two steps of 6 per epoch, 4 images left out
    out = tmp_path / "ft"
    p = run("finetune", db, "--model", model, "--out", out, "--split", "all", "--batch", 6,
            "--epochs", 1, "--lr", "1e-4", check=True)
    assert "12 pairs per epoch, 2 steps per epoch, 2 steps" in p.stderr
    assert made(out)["steps"] == 2


# ---- the written model -----------------------------------------------------------


def test_written_model_loads_and_embeds(db, model, photos, tmp_path):
    same, moved = tmp_path / "lr0", tmp_path / "lr1"
    run("finetune", db, "--model", model, "--out", same, "--batch", 8, "--epochs", 1,
        "--lr", 0, "--wd", 0, check=True)
    run("finetune", db, "--model", model, "--out", moved, "--batch", 8, "--epochs", 1,
        "--lr", "1e-3", check=True)
    base = embed(model, photos)
    # lr 0 and no decay: the same weights, so the same embeddings, bit for bit
    assert embed(same, photos) == base
    # a real step moves them
    assert embed(moved, photos) != base
    info = run("model", "info", moved, check=True).stdout
    assert "openai" in info and "F32" in info
    m = made(moved)
    assert m["command"].startswith("clipdb finetune") and m["seed"] == 0 and m["steps"] == 1
    for f in ("bpe_simple_vocab_16e6.txt.gz", "model.safetensors"):
        assert (moved / f).is_file()
    # and a database can be built on it
    run("init", tmp_path / "again.db", "--model", moved, check=True)


def test_hf_model_keeps_its_convention_and_dtype(db, bpe_vocab, photos, tmp_path):
    hf = gen_model(tmp_path / "hf", "tiny", "hf", "F16", 3)
    out = tmp_path / "ft"
    # the database was made with the openai model of the same seed: fine-tuning
    # reads pairs only, any model may be given
    run("finetune", db, "--model", hf, "--out", out, "--batch", 8, "--epochs", 1, "--lr", 0,
        "--wd", 0, check=True)
    info = run("model", "info", out, check=True).stdout
    assert "hf" in info and "F16" in info
    assert weights(out) != b""
    assert embed(out, photos) == embed(hf, photos)


# ---- bad input ---------------------------------------------------------------------


def test_db_without_captions(model, photos, tmp_path):
    p = tmp_path / "nocap.db"
    run("init", p, "--model", model, check=True)
    run("add", p, "--images", photos / "images", "-q", check=True)
    r = run("finetune", p, "--model", model, "--out", tmp_path / "o", "--split", "all")
    one_line_failure(r, "finetune", "no images with captions")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()


def test_split_with_fewer_pairs_than_batch(db, model, tmp_path):
    r = run("finetune", db, "--model", model, "--out", tmp_path / "o", "--split", "small",
            "--batch", 8)
    one_line_failure(r, "finetune", "'small'", "4 captioned images", "fewer than --batch 8")
    r = run("finetune", db, "--model", model, "--out", tmp_path / "o", "--split", "nosuch")
    one_line_failure(r, "finetune", "no captioned images in split 'nosuch'", "'train' (8)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()


def test_out_exists_refused_unless_force(db, model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("mine")
    r = run("finetune", db, "--model", model, "--out", out, "--batch", 8, "--epochs", 1)
    one_line_failure(r, "finetune", "already exists", "--force")
    assert (out / "keep").read_text() == "mine"
    run("finetune", db, "--model", model, "--out", out, "--batch", 8, "--epochs", 1, "--force",
        check=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()


def test_nan_weights_refused_with_tensor_name(db, model, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(model, bad)
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    off = hdr["visual.class_embedding"]["data_offsets"][0]
    data[8 + n + off + 8:8 + n + off + 12] = struct.pack("<f", math.nan)
    path.write_bytes(bytes(data))
    r = run("finetune", db, "--model", bad, "--out", tmp_path / "o", "--batch", 8)
    one_line_failure(r, "finetune", "visual.class_embedding", "NaN")
    assert not (tmp_path / "o").exists()


def test_bad_options_are_usage_errors(db, model, tmp_path):
    for args, needle in [(["--batch", "1"], "--batch"), (["--schedule", "linear"], "--schedule"),
                         (["--betas", "0.9"], "--betas"), (["--lr", "x"], "--lr"),
                         (["--dtype", "F8"], "--dtype"), (["--precision", "fp16"], "--precision")]:
        r = run("finetune", db, "--model", model, "--out", tmp_path / "o", *args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
    r = run("finetune", db, "--model", model, "--out", tmp_path / "o", "--train", "some")
    one_line_failure(r, "finetune", "some")
    r = run("train", "--images", tmp_path, "--captions", tmp_path / "c", "--out", tmp_path / "o",
            "--tokenizer", model, "--arch", "vit:image=30,patch=16,width=64,layers=1;"
            "text:width=64,layers=1;embed=32")
    one_line_failure(r, "train", "image 30 is not a multiple of patch 16")
    r = run("train", "--images", tmp_path, "--captions", tmp_path / "c", "--out", tmp_path / "o",
            "--tokenizer", model, "--arch", "vit:image=32,patch=16,width=64,layers=1,heads=2;"
            "text:width=64,layers=1;embed=32")
    one_line_failure(r, "train", "heads=2", "width/64 = 1")


def mount_tmpfs(where, opts):
    where.mkdir(exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}); skipping")


def umount(where):
    subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_model_dir_and_out_dir(db, model, photos, tmp_path):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "size=64m")
    try:
        shutil.copytree(model, ro / "m")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        # a read-only model directory is only read: fine-tuning works
        out = tmp_path / "o"
        run("finetune", db, "--model", ro / "m", "--out", out, "--batch", 8, "--epochs", 1,
            "--lr", 0, "--wd", 0, check=True)
        assert embed(out, photos) == embed(model, photos)
        # an --out on a read-only file system: a clear error before any step
        r = run("finetune", db, "--model", model, "--out", ro / "o", "--batch", 8)
        one_line_failure(r, "finetune", "cannot create", "Read-only file system")
        assert "step" not in r.stderr.split("clipdb finetune:")[0]
    finally:
        umount(ro)


def test_disk_full_while_checkpointing_keeps_the_previous_one(db, model, tmp_path):
    # The tiny model's checkpoint is ~38 MB (params + AdamW m and v); a 60 MB
    # file system holds one but not a second beside it.
    small = tmp_path / "small"
    mount_tmpfs(small, "size=60m")
    try:
        out = small / "o"
        args = ["finetune", db, "--model", model, "--out", out, "--split", "all", "--batch", 4,
                "--epochs", 1, "--lr", "1e-3", "--checkpoint-every", 1]
        r = run(*args, "-q")
        one_line_failure(r, "finetune", "checkpoint", "No space left on device")
        state = small / "o.ckpt" / "state.safetensors"
        assert state.is_file()
        assert [f.name for f in (small / "o.ckpt").iterdir() if ".tmp." in f.name] == []
        # the survivor is a complete checkpoint of step 1: give room, run the
        # same command, and it resumes from it and finishes
        subprocess.run(["mount", "-o", "remount,size=200m", str(small)], check=True)
        r = run(*args, check=True)
        assert "resuming from" in r.stderr and "at step 1 of 4" in r.stderr
        ref = tmp_path / "ref"
        run(*[a if a != out else ref for a in args], check=True)
        assert weights(out) == weights(ref)
    finally:
        umount(small)


# ---- interruption and resumption ---------------------------------------------------


def start(args):
    return subprocess.Popen([BIN, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(p, needle, timeout=120):
    t0 = time.time()
    lines = []
    while time.time() - t0 < timeout:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no '{needle}' in: {''.join(lines)}")


@pytest.mark.parametrize("kill_after", ["checkpoint at step 1:", "checkpoint at step 3:"])
def test_sigkill_then_resume_equals_uninterrupted(photos, model, tmp_path, kill_after):
    common = ["train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
              "--tokenizer", model, "--arch", ARCH, "--batch", 4, "--epochs", 2, "--val", 0.25,
              "--seed", 11, "--checkpoint-every", 1, "--progress-every", 0.01]
    ref = tmp_path / "ref"
    run(*common, "--out", ref, check=True)
    killed_then_resumed(common, tmp_path / "o", kill_after)
    assert weights(tmp_path / "o") == weights(ref)  # bit for bit
    assert not (tmp_path / "o.ckpt").exists()


def killed_then_resumed(common, out, kill_after):
    """Runs `clipdb *common --out out`, SIGKILLs it once it prints kill_after,
    checks that only the checkpoint is left, and runs it again to the end."""
    p = start([*common, "--out", out])
    wait_for_line(p, kill_after)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    assert (out.parent / (out.name + ".ckpt") / "state.safetensors").is_file()
    r = run(*common, "--out", out, check=True)
    assert "resuming from" in r.stderr


def test_sigkill_at_random_moments(db, model, tmp_path):
    args = ["finetune", db, "--model", model, "--split", "all", "--batch", 4, "--epochs", 2,
            "--lr", "1e-3", "--seed", 5, "--checkpoint-every", 1]
    ref = tmp_path / "ref"
    run(*args, "--out", ref, check=True)
    out = tmp_path / "o"
    for delay in (0.3, 1.1, 0.7, 1.9):  # during start-up, steps and checkpoint writes
        p = start([*args, "--out", out])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            break
    if not out.exists():
        run(*args, "--out", out, check=True)
    assert weights(out) == weights(ref)


def test_sigint_writes_a_checkpoint_and_resumes(db, model, tmp_path):
    args = ["finetune", db, "--model", model, "--split", "all", "--batch", 4, "--epochs", 3,
            "--lr", "1e-3", "--seed", 2, "--progress-every", 0.01]
    ref = tmp_path / "ref"
    run(*args, "--out", ref, check=True)
    out = tmp_path / "o"
    p = start([*args, "--out", out])
    wait_for_line(p, "step 2/")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "run the same command to resume" in err
    ckpt = tmp_path / "o.ckpt" / "state.safetensors"
    assert ckpt.is_file() and not out.exists()
    r = run(*args, "--out", out, check=True)
    assert "resuming from" in r.stderr
    assert weights(out) == weights(ref)


@pytest.mark.parametrize("other", [["--seed", 3], ["--precision", "bf16"]])
def test_checkpoint_of_other_options_is_not_resumed(db, model, tmp_path, other):
    args = ["finetune", db, "--model", model, "--split", "all", "--batch", 4, "--epochs", 2,
            "--seed", 2, "--out", tmp_path / "o"]
    other_options_not_resumed(args, other)  # another seed; another GEMM precision


def other_options_not_resumed(args, other):
    """Stops the run of args (argv[0] its command, ending in --out DIR) with Ctrl-C
    after its first step, then runs it again with the options `other`: the
    checkpoint is not resumed (one clear line), and it is kept."""
    args = args + ["--progress-every", 0.01]
    p = start(args)
    wait_for_line(p, "step 1/")
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=120)
    assert p.returncode == 130
    r = run(*args, *other)
    one_line_failure(r, args[0], "other options or data", "delete it to start over")
    out = pathlib.Path(str(args[args.index("--out") + 1]))
    assert (out.parent / (out.name + ".ckpt") / "state.safetensors").is_file()  # kept


# ---- training from scratch ---------------------------------------------------------


def test_train_from_scratch_validates_and_writes(photos, model, tmp_path):
    out = tmp_path / "scratch"
    r = run("train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
            "--tokenizer", model, "--arch", ARCH, "--split", "train", "--val-split", "val",
            "--batch", 4, "--epochs", 2, "--dtype", "F16", "--out", out, check=True)
    assert "8 pairs per epoch, 2 steps per epoch, 4 steps" in r.stderr
    # R@1/5/10 of 4 held-out images (8 captions) each epoch, both directions
    vals = [l for l in r.stderr.splitlines() if "validation (4 images)" in l]
    assert len(vals) == 2 and "text->image R@1/5/10" in vals[0] and "image->text" in vals[0]
    info = run("model", "info", out, check=True).stdout
    assert "F16" in info and "openai" in info and "32 x 32 pixels" in info
    m = made(out)
    assert m["made_by"] == "clipdb train" and m["augment"] is True and m["val_pairs"] == 4
    assert len(embed(out, photos)[0]) == 32


def test_train_same_seed_same_model_other_seed_other(photos, model, tmp_path):
    common = ["train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
              "--tokenizer", model, "--arch", ARCH, "--batch", 4, "--epochs", 1, "--val", 0]
    run(*common, "--seed", 1, "--out", tmp_path / "a", check=True)
    run(*common, "--seed", 1, "--out", tmp_path / "b", check=True)
    run(*common, "--seed", 2, "--out", tmp_path / "c", check=True)
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    assert weights(tmp_path / "a") != weights(tmp_path / "c")


def test_precision_bf16_trains_records_and_is_deterministic(photos, model, tmp_path):
    """--precision bf16: the run says so in clipdb_made.json, is as deterministic
    as fp32 (same seed, same weights), and ends near but not at fp32's weights."""
    common = ["train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
              "--tokenizer", model, "--arch", ARCH, "--batch", 4, "--epochs", 2, "--val", 0,
              "--seed", 1, "--lr", "1e-3"]
    run(*common, "--out", tmp_path / "f", check=True)
    run(*common, "--precision", "bf16", "--out", tmp_path / "a", check=True)
    run(*common, "--precision", "bf16", "--out", tmp_path / "b", check=True)
    assert made(tmp_path / "f")["precision"] == "fp32"
    assert made(tmp_path / "a")["precision"] == "bf16"
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    assert weights(tmp_path / "a") != weights(tmp_path / "f")
    ea, ef = embed(tmp_path / "a", photos), embed(tmp_path / "f", photos)
    for x, y in zip(ea, ef):
        cos = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
        assert cos > 0.99, cos


def test_crop_min_changes_the_augmentation_is_recorded_and_checked(photos, model, tmp_path):
    """--crop-min: the smallest random crop. It changes what the model sees (other
    weights from the same seed), is recorded in clipdb_made.json, takes part in the
    checkpoint's identity, and is refused outside (0, 1]."""
    common = one_epoch_from_scratch(photos, model)
    run(*common, "--out", tmp_path / "d", check=True)
    run(*common, "--crop-min", "0.5", "--out", tmp_path / "h", check=True)
    run(*common, "--crop-min", "0.1", "--out", tmp_path / "s", check=True)
    assert made(tmp_path / "d")["crop_min"] == 0.5 and made(tmp_path / "s")["crop_min"] == 0.1
    assert weights(tmp_path / "d") == weights(tmp_path / "h")  # 0.5 is the default
    assert weights(tmp_path / "d") != weights(tmp_path / "s")
    for bad in ["0", "-0.2", "1.5", "nan", "x"]:
        r = run(*common, "--crop-min", bad, "--out", tmp_path / "o")
        assert r.returncode == 2 and "--crop-min" in r.stderr, (bad, r.stderr)
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()
    other_options_not_resumed(common + ["--epochs", 3, "--out", tmp_path / "k"],
                              ["--crop-min", "0.3"])


def one_epoch_from_scratch(photos, model):
    """The arguments of a one-epoch training of ARCH on the photos, seed 1."""
    return ["train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
            "--tokenizer", model, "--arch", ARCH, "--batch", 4, "--epochs", 1, "--val", 0,
            "--seed", 1]


def zero_default_option_is_recorded_and_checked(common, tmp_path, opt, key, value, bad):
    """An option whose default is 0 (no effect): 0 given trains the default's
    weights, `value` others; both are recorded under `key` in
    clipdb_made.json; the values in `bad` are refused (status 2, the option
    named); and the option is part of the checkpoint's identity."""
    run(*common, "--out", tmp_path / "n", check=True)
    run(*common, opt, "0", "--out", tmp_path / "z", check=True)
    run(*common, opt, value, "--out", tmp_path / "a", check=True)
    assert made(tmp_path / "n")[key] == 0 and made(tmp_path / "a")[key] == float(value)
    assert weights(tmp_path / "n") == weights(tmp_path / "z")
    assert weights(tmp_path / "a") != weights(tmp_path / "n")
    for b in bad:
        r = run(*common, opt, b, "--out", tmp_path / "o")
        assert r.returncode == 2 and opt in r.stderr, (b, r.stderr)
    other_options_not_resumed(common + ["--epochs", 3, "--out", tmp_path / "k"], [opt, value])


def test_text_drop_augments_the_captions_is_recorded_and_checked(photos, model, tmp_path):
    """--text-drop P: each caption token dropped with probability P while training
    from scratch. Deterministic with the seed, other weights than without, recorded,
    part of the checkpoint's identity, refused outside [0, 1)."""
    common = one_epoch_from_scratch(photos, model)
    zero_default_option_is_recorded_and_checked(common, tmp_path, "--text-drop", "text_drop",
                                                "0.5", ["1", "-0.1", "nan", "x"])
    run(*common, "--text-drop", "0.5", "--out", tmp_path / "b", check=True)
    run(*common, "--text-drop", "0.99", "--out", tmp_path / "c", check=True)  # one token left
    assert weights(tmp_path / "a") == weights(tmp_path / "b")


def test_patch_drop_is_deterministic_recorded_and_checked(photos, model, tmp_path):
    """--patch-drop P: each step an image runs on a seeded random share 1 - P
    of its patches (the gradients are checked against torch in tests/ref).
    Deterministic with the seed, other weights than without, recorded, part of
    the checkpoint's identity, refused outside [0, 1); --no-augment turns it
    off like the other augmentations."""
    common = one_epoch_from_scratch(photos, model)
    zero_default_option_is_recorded_and_checked(common, tmp_path, "--patch-drop", "patch_drop",
                                                "0.5", ["1", "-0.1", "nan", "x"])
    run(*common, "--patch-drop", "0.5", "--out", tmp_path / "b", check=True)
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    run(*common, "--patch-drop", "0.99", "--out", tmp_path / "c", check=True)  # one patch left
    run(*common, "--patch-drop", "0.5", "--no-augment", "--out", tmp_path / "d", check=True)
    run(*common, "--no-augment", "--out", tmp_path / "e", check=True)
    assert made(tmp_path / "d")["patch_drop"] == 0
    assert weights(tmp_path / "d") == weights(tmp_path / "e")


def test_label_smoothing_is_recorded_and_checked(photos, model, tmp_path):
    """--label-smoothing E (the loss itself is checked against torch in
    tests/ref): 0 is the default and the paper's loss, another E trains other
    weights, it is recorded, part of the checkpoint's identity, and refused
    outside [0, 1)."""
    common = one_epoch_from_scratch(photos, model)
    zero_default_option_is_recorded_and_checked(common, tmp_path, "--label-smoothing",
                                                "label_smoothing", "0.1",
                                                ["1", "-0.1", "nan", "x"])


# ---- a ResNet image tower (CLIP's ModifiedResNet) ---------------------------------

RN_ARCH = "rn:image=32,width=4,layers=1.1.1.1;text:width=64,layers=1,context=16;embed=32"


def st_tensors(out):
    """{name: list of floats} of the F32 / F16 tensors of a model (others skipped)."""
    raw = (pathlib.Path(out) / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__" or v["dtype"] not in ("F32", "F16"):
            continue
        a, b = v["data_offsets"]
        fmt = {"F32": "f", "F16": "e"}[v["dtype"]]
        size = struct.calcsize(fmt)
        out[k] = list(struct.unpack(f"<{(b - a) // size}{fmt}", raw[8 + n + a:8 + n + b]))
    return out


def test_resnet_trains_from_scratch_and_resumes_bit_for_bit(photos, model, tmp_path):
    """rn:... trains CLIP's ModifiedResNet (the gradients are checked against
    torch in tests/ref): the written model is a ResNet that loads and embeds,
    its batch norms' running statistics moved away from the initial 0 / 1
    (and each bottleneck's bn3 gain from CLIP's initial 0), and a run killed
    after a checkpoint resumes to the same bytes as an uninterrupted one (the
    running statistics are part of the checkpoint)."""
    common = ["train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
              "--tokenizer", model, "--arch", RN_ARCH, "--batch", 4, "--epochs", 2, "--val", 0.25,
              "--seed", 11, "--checkpoint-every", 1, "--progress-every", 0.01]
    ref = tmp_path / "ref"
    r = run(*common, "--out", ref, check=True)
    assert "validation (4 images)" in r.stderr
    info = run("model", "info", ref, check=True).stdout
    assert "ResNet" in info and "bottlenecks 1-1-1-1" in info and "32 x 32 pixels" in info
    assert made(ref)["start"].startswith("arch rn:image=32,width=4,layers=1.1.1.1")
    t = st_tensors(ref)
    assert all(k in t for k in ("visual.conv1.weight", "visual.bn1.running_var",
                                "visual.layer4.0.downsample.1.running_mean",
                                "visual.attnpool.c_proj.weight"))
    assert any(abs(x) > 1e-6 for x in t["visual.layer1.0.bn1.running_mean"])
    assert any(abs(x - 1) > 1e-3 for x in t["visual.layer1.0.bn1.running_var"])
    assert any(abs(x) > 1e-6 for x in t["visual.layer1.0.bn3.weight"])
    assert len(embed(ref, photos)[1]) == 32
    killed_then_resumed(common, tmp_path / "o", "checkpoint at step 3:")
    assert weights(tmp_path / "o") == weights(ref)  # bit for bit


def test_resnet_finetunes_and_refuses_patch_dropout(db, bpe_vocab, photos, tmp_path):
    """A loaded ResNet CLIP (generated rn-tiny) fine-tunes, whole or its
    projections only (the attention pool's c_proj, text_projection and
    logit_scale); --patch-drop is refused for a ResNet (it has no patches)."""
    rn = gen_model(tmp_path / "rn", "rn-tiny", "openai", "F32", 3)
    rdb = tmp_path / "rn.db"
    run("init", rdb, "--model", rn, check=True)
    run("add", rdb, "--images", photos / "images", "--captions", photos / "captions.jsonl", "-q",
        check=True)
    before = st_tensors(rn)
    for what in ("all", "proj"):
        out = tmp_path / f"ft-{what}"
        run("finetune", rdb, "--model", rn, "--out", out, "--split", "train", "--batch", 4,
            "--epochs", 1, "--lr", "1e-3", "--train", what, check=True)
        after = st_tensors(out)
        assert after["visual.attnpool.c_proj.weight"] != before["visual.attnpool.c_proj.weight"]
        moved = after["visual.layer1.0.conv2.weight"] != before["visual.layer1.0.conv2.weight"]
        assert moved == (what == "all")
        assert len(embed(out, photos)[1]) == len(embed(rn, photos)[1])
    r = run("train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
            "--tokenizer", rn, "--arch", RN_ARCH, "--batch", 4, "--epochs", 1, "--val", 0,
            "--patch-drop", "0.5", "--out", tmp_path / "pd")
    assert r.returncode != 0 and "--patch-drop needs a ViT image tower" in r.stderr


@pytest.mark.parametrize("spec, message", [
    ("rn:image=48,width=4,layers=1.1.1.1", "not a multiple of 32"),
    ("rn:image=32,width=3,layers=1.1.1.1", "not even"),
    ("rn:image=32,width=4,layers=1.1.1", "4 integers"),
    ("rn:image=32,width=4,layers=1.0.1.1", "4 integers"),
    ("rn:image=32,width=4", "needs rn:image=S,width=W,layers=A.B.C.D"),
    ("rn:image=32,width=4,layers=1.1.1.1;vit:image=32,patch=16,width=64,layers=1",
     "one image tower"),
])
def test_resnet_arch_errors_are_named(photos, model, tmp_path, spec, message):
    r = run("train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
            "--tokenizer", model, "--arch", spec + ";text:width=64,layers=1;embed=32",
            "--out", tmp_path / "x")
    one_line_failure(r, "train", message)


# ---- an exponential moving average of the weights (--ema) ---------------------------


def test_captions_per_image_is_recorded_checked_and_resumes(photos, db, model, tmp_path):
    """--captions-per-image K: each image of a step is paired with K of its
    captions (the loss is checked against torch in tests/ref). 1, the
    default, trains the default's weights; 2 others, the same on a second
    run; 3 with two captions an image goes round to the drawn one again
    (accepted, other weights). Recorded in clipdb_made.json, refused outside
    1..16, part of the checkpoint's identity; a run killed after a checkpoint
    resumes to the bytes of an uninterrupted one; finetune takes it too."""
    common = one_epoch_from_scratch(photos, model)
    opt = "--captions-per-image"
    run(*common, "--out", tmp_path / "n", check=True)
    run(*common, opt, "1", "--out", tmp_path / "one", check=True)
    for name, k in (("a", "2"), ("b", "2"), ("c", "3")):
        run(*common, opt, k, "--out", tmp_path / name, check=True)
    assert made(tmp_path / "n")["captions_per_image"] == 1
    assert made(tmp_path / "a")["captions_per_image"] == 2
    assert made(tmp_path / "c")["captions_per_image"] == 3
    assert weights(tmp_path / "n") == weights(tmp_path / "one")
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    assert len({weights(tmp_path / x) for x in ("n", "a", "c")}) == 3
    for bad in ("0", "17", "-1", "1.5", "x"):
        r = run(*common, opt, bad, "--out", tmp_path / "o")
        assert r.returncode == 2 and opt in r.stderr, (bad, r.stderr)
    other_options_not_resumed(common + ["--epochs", 3, "--out", tmp_path / "k"], [opt, "2"])
    args = common[:common.index("--epochs")] + ["--epochs", 2, "--checkpoint-every", 1,
                                                "--progress-every", 0.01, "--text-drop", "0.3",
                                                opt, "2"]
    run(*args, "--out", tmp_path / "ref", check=True)
    killed_then_resumed(args, tmp_path / "r", "checkpoint at step 1:")
    assert weights(tmp_path / "r") == weights(tmp_path / "ref")  # bit for bit
    run("finetune", db, "--model", model, "--split", "train", "--batch", 4, "--epochs", 1,
        "--lr", "1e-3", opt, "2", "--out", tmp_path / "ft", "-q", check=True)
    assert made(tmp_path / "ft")["captions_per_image"] == 2


def test_ema_is_recorded_and_checked(photos, model, tmp_path):
    """--ema D: 0 is the default (the weights as trained), another D writes
    other weights; recorded, part of the checkpoint's identity, refused
    outside [0, 1)."""
    common = one_epoch_from_scratch(photos, model)
    zero_default_option_is_recorded_and_checked(common, tmp_path, "--ema", "ema", "0.5",
                                                ["1", "-0.1", "nan", "x"])


def test_ema_writes_the_average_of_the_trained_weights(db, model, tmp_path):
    """The model written with --ema D is avg_3, where avg_0 is the starting
    model, avg_t = d_t avg_(t-1) + (1 - d_t) w_t, d_t = min(D, (1 + t) / (10 + t)),
    and w_t are the weights after t steps: those that runs of 1, 2 and 3 steps
    without --ema write (a constant rate: the first steps of a longer run are
    the same). Computed here in float64 from the written files."""
    args = ["finetune", db, "--model", model, "--split", "train", "--batch", 8, "--lr", "1e-3",
            "--seed", 3, "--dtype", "F32", "-q"]
    for e in (1, 2, 3):
        run(*args, "--epochs", e, "--out", tmp_path / f"w{e}", check=True)
    run(*args, "--epochs", 3, "--ema", "0.27", "--out", tmp_path / "avg", check=True)
    assert made(tmp_path / "avg")["ema"] == pytest.approx(0.27)
    avg = {k: [float(x) for x in v] for k, v in st_tensors(model).items()}
    for t in (1, 2, 3):
        d = min(0.27, (1 + t) / (10 + t))  # 2/11, 3/12, then 0.27
        w = st_tensors(tmp_path / f"w{t}")
        avg = {k: [d * a + (1 - d) * b for a, b in zip(v, w[k])] for k, v in avg.items()}
    got, w3 = st_tensors(tmp_path / "avg"), st_tensors(tmp_path / "w3")
    assert set(got) == set(avg)
    worst = max(abs(a - b) for k in avg for a, b in zip(avg[k], got[k]))
    moved = max(abs(a - b) for k in avg for a, b in zip(w3[k], got[k]))
    assert worst < 1e-6 and moved > 1e-4, (worst, moved)


def test_ema_resumes_bit_for_bit_and_reports_both_weights(photos, model, tmp_path):
    """A ResNet (the batch norms' running statistics are averaged too) trained
    with --ema, killed after a checkpoint, resumes to the bytes of an
    uninterrupted run (the average is in the checkpoint); the last epoch's
    validation line measures the average and the weights as trained."""
    common = ["train", "--images", photos / "images", "--captions", photos / "captions.jsonl",
              "--tokenizer", model, "--arch", RN_ARCH, "--batch", 4, "--epochs", 2, "--val", 0.25,
              "--seed", 11, "--checkpoint-every", 1, "--progress-every", 0.01, "--ema", "0.9"]
    ref = tmp_path / "ref"
    r = run(*common, "--out", ref, check=True)
    last = [l for l in r.stderr.splitlines() if l.startswith("epoch 2/2 done")]
    first = [l for l in r.stderr.splitlines() if l.startswith("epoch 1/2 done")]
    assert len(last) == 1 and "(the average of the weights); the weights as trained" in last[0]
    assert len(first) == 1 and "weights as trained" not in first[0]
    killed_then_resumed(common, tmp_path / "o", "checkpoint at step 3:")
    assert weights(tmp_path / "o") == weights(ref)  # bit for bit
    plain = tmp_path / "plain"
    run(*common[:-2], "--out", plain, check=True)
    assert weights(plain) != weights(ref)
