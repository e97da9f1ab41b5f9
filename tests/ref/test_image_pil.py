"""Image decoding + CLIP preprocessing against PIL + torchvision.

The reference is what CLIP's preprocessing computes on a PIL image:
ImageOps.exif_transpose(Image.open(f)).convert("RGB"), then torchvision's
Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize(CLIP mean, std).
Our side is build/tools/preprocess_dump (src/model/image.c).
"""
import os
import pathlib
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
import torchvision.transforms as T

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", str(ROOT / "build")))
TOOL = BUILD / "tools" / "preprocess_dump"
S = 224
STD_MIN = 0.26130258  # smallest CLIP std: one 8-bit level is at most 1/255/STD_MIN
LEVEL = 1.0 / 255.0 / STD_MIN

REF = T.Compose([
    T.Resize(S, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(S),
    T.ToTensor(),
    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])


@pytest.fixture(scope="module")
def tool():
    assert TOOL.is_file(), f"{TOOL} is not built (make {TOOL.relative_to(ROOT)})"
    return TOOL


def pil_rgb(path):
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def ours(tool, path, tmp, dct=False):
    """(normalised tensor (3, S, S), decoded RGB (h, w, 3))."""
    f32, rgb = tmp / "out.f32", tmp / "out.rgb"
    args = [str(tool), str(path), str(f32), "--rgb", str(rgb)]
    if not dct:
        args.append("--no-dct-scale")
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"preprocess_dump {path} failed: {p.stderr}"
    w, h = map(int, p.stdout.split())
    x = np.fromfile(f32, np.float32).reshape(3, S, S)
    return x, np.fromfile(rgb, np.uint8).reshape(h, w, 3)


def summarise(diffs):
    """(max, mean of per-image means) of absolute differences."""
    return max(float(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))


def compare(tool, paths, tmp, label):
    """Asserts decoder and tensor parity with PIL over paths; returns stats."""
    diffs = []
    for p in paths:
        im = pil_rgb(p)
        ref = REF(im).numpy()
        x, rgb = ours(tool, p, tmp)
        want = np.asarray(im)
        assert rgb.shape == want.shape, f"{p}: decoded {rgb.shape}, PIL {want.shape}"
        rgb_diff = int(np.abs(rgb.astype(int) - want.astype(int)).max())
        assert rgb_diff == 0, f"{p}: decoded RGB differs from PIL by {rgb_diff}"
        diffs.append(np.abs(x - ref))
    mx, mn = summarise(diffs)
    print(f"\n[{label}] {len(paths)} images: max abs diff {mx:.3g}, mean {mn:.3g} "
          f"(normalised tensor; one 8-bit level = {LEVEL:.4f})")
    # Same bytes as PIL before normalisation, same float32 arithmetic after:
    # anything above float rounding noise is a real difference.
    assert mx <= 1e-6, f"[{label}] max abs diff {mx}"
    return mx, mn


def coco(shared, n):
    d = shared / "data" / "coco-subset" / "images"
    files = sorted(d.glob("*.jpg"))[:n]
    if not files:
        pytest.skip(f"no COCO images in {d}")
    return files


def test_coco_jpeg_matches_pil(tool, shared, tmp_path):
    compare(tool, coco(shared, 30), tmp_path, "coco jpeg")


def test_flickr8k_jpeg_matches_pil(tool, shared, tmp_path):
    d = shared / "data" / "flickr8k" / "images"
    files = sorted(d.glob("*.jpg"))[:15]
    if not files:
        pytest.skip(f"no flickr8k images in {d}")
    compare(tool, files, tmp_path, "flickr8k jpeg 224x224")


def converted(shared, tmp, n=6):
    """PNG/WebP/BMP/GIF/JPEG variants of COCO photos, made with PIL."""
    out = []
    for i, src in enumerate(coco(shared, n)):
        im = Image.open(src).convert("RGB")
        if i % 2:  # cover a downscale that is not by an integer factor
            im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.BICUBIC)
        rgba = im.copy()
        rgba.putalpha(Image.linear_gradient("L").resize(im.size))
        variants = {
            "rgb.png": (im, {}),
            "rgba.png": (rgba, {}),
            "l.png": (im.convert("L"), {}),
            "la.png": (im.convert("LA"), {}),
            "p.png": (im.convert("P", palette=Image.ADAPTIVE, colors=200), {}),
            "p-trns.png": (im.convert("P", palette=Image.ADAPTIVE, colors=64),
                           {"transparency": 3}),
            "1bit.png": (im.convert("1"), {}),
            "lossy.webp": (im, {"quality": 80}),
            "lossless.webp": (im, {"lossless": True}),
            "rgba.webp": (rgba, {"lossless": True}),
            "anim.webp": (im, {"save_all": True, "duration": 100, "quality": 80,
                               "append_images": [im.transpose(Image.Transpose.ROTATE_180)]}),
            "rgb.bmp": (im, {}),
            "p.bmp": (im.convert("P", palette=Image.ADAPTIVE, colors=256), {}),
            "l.bmp": (im.convert("L"), {}),
            "p.gif": (im.convert("P", palette=Image.ADAPTIVE, colors=256), {}),
            "p-trns.gif": (im.convert("P", palette=Image.ADAPTIVE, colors=128),
                           {"transparency": 5}),
            "gray.jpg": (im.convert("L"), {"quality": 90}),
            "cmyk.jpg": (im.convert("CMYK"), {"quality": 90}),
            "progressive.jpg": (im, {"quality": 85, "progressive": True}),
            "444.jpg": (im, {"quality": 95, "subsampling": 0}),
        }
        for name, (img, kw) in variants.items():
            p = tmp / f"{i}-{name}"
            img.save(p, **kw)
            out.append(p)
    return out


def write_png(path, arr, color_type, depth=8, adam7=False):
    """A PNG written by hand (PIL writes neither 16-bit RGB nor Adam7)."""
    h, w = arr.shape[:2]
    dt = ">u2" if depth == 16 else "u1"
    if adam7:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                  (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    else:
        passes = [(0, 0, 1, 1)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.astype(dt).tobytes() for row in sub)

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 1 if adam7 else 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_other_formats_match_pil(tool, shared, tmp_path):
    files = converted(shared, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    for kind in sorted({p.name.split("-", 1)[1] for p in files}):
        compare(tool, [p for p in files if p.name.endswith("-" + kind)], work, kind)


def test_interlaced_and_16bit_png_match_pil(tool, shared, tmp_path):
    src = Image.open(coco(shared, 1)[0]).convert("RGB")
    a8 = np.asarray(src)
    rng = np.random.default_rng(7)
    a16 = a8.astype(np.uint16) * 257 + rng.integers(0, 256, a8.shape, dtype=np.uint16)
    paths = []
    p = tmp_path / "rgb16.png"
    write_png(p, a16, 2, 16)
    paths.append(p)
    p = tmp_path / "rgba16.png"
    write_png(p, np.concatenate([a16, a16[..., :1]], axis=2), 6, 16)
    paths.append(p)
    # 16-bit grey: PIL opens it as mode "I" and convert("RGB") clips at 255;
    # use small values so that both clipped and unclipped pixels occur.
    p = tmp_path / "grey16.png"
    write_png(p, a16[..., 0] // 128, 0, 16)
    paths.append(p)
    p = tmp_path / "adam7.png"
    write_png(p, a8, 2, 8, adam7=True)
    paths.append(p)
    p = tmp_path / "adam7-grey16.png"
    write_png(p, a16[..., 1] // 200, 0, 16, adam7=True)
    paths.append(p)
    work = tmp_path / "work"
    work.mkdir()
    compare(tool, paths, work, "16-bit and Adam7 png")


def test_exif_orientation_matches_exif_transpose(tool, shared, tmp_path):
    im = Image.open(coco(shared, 1)[0]).convert("RGB")  # 640x426: transposes differ
    paths = []
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        p = tmp_path / f"orient{o}.jpg"
        im.save(p, quality=92, exif=exif.tobytes())
        paths.append(p)
    work = tmp_path / "work"
    work.mkdir()
    compare(tool, paths, work, "exif orientation 1..8")
    # the transposes really happened (5..8 swap width and height)
    _, rgb6 = ours(tool, paths[5], work)
    assert rgb6.shape[:2] == (im.width, im.height)


def test_dct_scaled_decode_stays_close_to_full_decode(tool, shared, tmp_path):
    """Large JPEGs decode at a reduced DCT scale (shorter side kept >= 3x224).
    That is a different low-pass than Pillow's bicubic on full pixels, so the
    result is not bit-exact: differences are confined to sharp edges. Assert
    max <= 0.1 (about 6.7 8-bit levels) and mean <= 0.006 (0.4 level)."""
    diffs = []
    for i, src in enumerate(coco(shared, 6)):
        im = Image.open(src).convert("RGB")
        s = 2000 / max(im.size)
        big = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
        if i % 2:
            big = big.transpose(Image.Transpose.TRANSPOSE)
            exif = Image.Exif()
            exif[0x0112] = 6
            kw = {"exif": exif.tobytes()}
        else:
            kw = {}
        p = tmp_path / f"big{i}.jpg"
        big.save(p, quality=90, **kw)
        full, _ = ours(tool, p, tmp_path, dct=False)
        ref = REF(pil_rgb(p)).numpy()
        assert np.abs(full - ref).max() <= 1e-6, "full decode must match PIL exactly"
        scaled, rgb = ours(tool, p, tmp_path, dct=True)
        assert min(rgb.shape[:2]) < min(big.size), "no DCT scaling happened"
        assert min(rgb.shape[:2]) >= 3 * S
        diffs.append(np.abs(scaled - full))
    mx, mn = summarise(diffs)
    print(f"\n[dct-scaled vs full decode, 2000px JPEGs] max abs diff {mx:.4f} "
          f"({mx / LEVEL:.1f} levels), mean {mn:.5f} ({mn / LEVEL:.2f} levels)")
    assert mx <= 0.1
    assert mn <= 0.006


def test_bad_files_fail_with_clear_message(tool, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    cases = {
        text: "not a recognised image (JPEG, PNG, WebP, BMP, GIF)",
        tmp_path / "missing.png": "missing.png",
    }
    for path, want in cases.items():
        p = subprocess.run([str(tool), str(path), str(tmp_path / "o.f32")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert want in p.stderr, p.stderr
        assert str(path) in p.stderr
