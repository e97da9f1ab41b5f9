"""The training augmentation (cdb_image_preprocess_box, used by clipdb train)
against torchvision: crop a box, resize it to S x S with BICUBIC on the PIL
image (torchvision.transforms.functional.resized_crop, what RandomResizedCrop
applies), optional horizontal flip, ToTensor, Normalize. Our side is
build/tools/preprocess_dump --box.
"""
import os
import pathlib
import random
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageOps
import torchvision.transforms as T
import torchvision.transforms.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", str(ROOT / "build")))
TOOL = BUILD / "tools" / "preprocess_dump"
NORM = T.Compose([T.ToTensor(), T.Normalize((0.48145466, 0.4578275, 0.40821073),
                                            (0.26862954, 0.26130258, 0.27577711))])


def test_random_resized_crop_and_flip_match_torchvision(shared, tmp_path):
    assert TOOL.is_file(), f"{TOOL} is not built"
    d = shared / "data" / "coco-subset" / "images"
    paths = sorted(d.iterdir())[:12]
    rng = random.Random(7)
    worst = 0.0
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        for size in (64, 96):
            # boxes of every kind: small, large, the whole image, at the edges
            bw = rng.randint(1, w) if i % 3 else w
            bh = rng.randint(1, h) if i % 3 else h
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            flip = rng.randint(0, 1)
            out = tmp_path / "o.f32"
            r = subprocess.run([str(TOOL), str(p), str(out), "--size", str(size), "--box",
                                f"{x},{y},{bw},{bh},{flip}"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            ours = np.fromfile(out, np.float32).reshape(3, size, size)
            ref = F.resized_crop(im, y, x, bh, bw, [size, size],
                                 interpolation=T.InterpolationMode.BICUBIC)
            if flip:
                ref = F.hflip(ref)
            ref = NORM(ref).numpy()
            diff = float(np.abs(ours - ref).max())
            worst = max(worst, diff)
            assert diff <= 1e-6, f"{p.name} box {(x, y, bw, bh)} flip {flip} size {size}: {diff}"
    print(f"\n[augment] {len(paths) * 2} crops: max abs diff {worst:.3g}")


def test_box_outside_the_image_is_refused(shared, tmp_path):
    p = sorted((shared / "data" / "coco-subset" / "images").iterdir())[0]
    with Image.open(p) as im:
        w, h = im.size
    for box in (f"{w},0,1,1,0", f"0,0,{w + 1},1,0", "-1,0,1,1,0", "0,0,0,5,0"):
        r = subprocess.run([str(TOOL), str(p), str(tmp_path / "o.f32"), "--size", "32", "--box",
                            box], capture_output=True, text=True)
        assert r.returncode != 0 and "preprocessing failed" in r.stderr, box
