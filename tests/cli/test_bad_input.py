"""The bad-input list of the encoder issue, end to end through `clipdb embed`.

Each case must give exactly one line on stderr ("clipdb embed: ..."), exit
status 1, and no sanitizer report (`make asan` runs this file again under
ASan+UBSan). Unit tests cover the parsers in more depth; this file proves the
user sees a clear message for every item of the list.
"""
import io
import json
import shutil
import struct
import subprocess
import zlib

import pytest
from PIL import Image

import conftest
from conftest import BIN, gen_model, run


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared):
    return gen_model(tmp_path_factory.mktemp("bad") / "tiny", seed=5)


@pytest.fixture(scope="module")
def photo(shared):
    return sorted((shared / "data" / "coco-subset" / "images").glob("*.jpg"))[0]


def one_line_failure(p, *needles):
    return conftest.one_line_failure(p, "embed", *needles)


def embed_image(model, path):
    return run("embed", "--model", model, "--image", path)


# ---- images -----------------------------------------------------------------

def test_missing_file(model, tmp_path):
    one_line_failure(embed_image(model, tmp_path / "absent.jpg"), "absent.jpg")


def test_zero_byte_file(model, tmp_path):
    p = tmp_path / "zero.png"
    p.write_bytes(b"")
    one_line_failure(embed_image(model, p), "zero.png")


def test_truncated_jpeg(model, photo, tmp_path):
    data = photo.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    msg = one_line_failure(embed_image(model, p), "cut.jpg")
    assert "JPEG" in msg or "jpeg" in msg


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_with_absurd_dimensions(model, tmp_path):
    ihdr = struct.pack(">IIBBBBB", 1_000_000, 1_000_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    p = tmp_path / "huge.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) +
                  png_chunk(b"IEND", b""))
    one_line_failure(embed_image(model, p), "huge.png", "1000000x1000000")


def test_text_file_named_jpg(model, tmp_path):
    p = tmp_path / "readme.jpg"
    p.write_text("not an image at all\n" * 50)
    one_line_failure(embed_image(model, p), "readme.jpg", "not a recognised image")


def test_a_good_png_still_works(model, photo, tmp_path):
    # The counterpart of the cases above: the same path through a valid file succeeds.
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").save(buf, format="PNG")
    p = tmp_path / "ok.png"
    p.write_bytes(buf.getvalue())
    r = run("embed", "--model", model, "--image", p, "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["embedding"]) == 32


# ---- texts ------------------------------------------------------------------

def test_non_utf8_text(model):
    p = subprocess.run([BIN, "embed", "--model", str(model), "--text", b"na\xefve \xff"],
                       capture_output=True, text=True, errors="replace")
    one_line_failure(p, "UTF-8")


def test_empty_text(model):
    one_line_failure(run("embed", "--model", model, "--text", ""), "empty")


def test_ten_thousand_character_text(model):
    text = ("the quick brown fox " * 500)[:10_000]
    one_line_failure(run("embed", "--model", model, "--text", text), "77", "--truncate")
    r = run("embed", "--model", model, "--text", text, "--truncate", "--json")
    assert r.returncode == 0, r.stderr


# ---- lying safetensors headers ------------------------------------------------

def read_safetensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.fixture
def broken(model, tmp_path):
    """A copy of the model directory whose header a test rewrites."""
    d = tmp_path / "broken"
    shutil.copytree(model, d)
    st = d / "model.safetensors"
    header, data = read_safetensors(st)

    def rewrite(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        write_safetensors(st, h, data)
        return d
    return rewrite


def test_offsets_past_the_end(broken, photo):
    def lie(h):
        t = h["visual.proj"]
        t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0] + 10**12]
    one_line_failure(embed_image(broken(lie), photo), "visual.proj")


def test_overlapping_tensors(broken, photo):
    def lie(h):
        # text_projection claims the bytes of visual.proj (same size: 64 x 32 floats)
        h["text_projection"]["data_offsets"] = list(h["visual.proj"]["data_offsets"])
    msg = one_line_failure(embed_image(broken(lie), photo))
    assert "overlap" in msg


def test_wrong_dtype(broken, photo):
    def lie(h):
        h["ln_final.weight"]["dtype"] = "I64"  # 8-byte ints: the byte count no longer fits
    one_line_failure(embed_image(broken(lie), photo), "ln_final.weight")


def test_wrong_dtype_same_size(broken, photo):
    def lie(h):
        h["ln_final.weight"]["dtype"] = "I32"  # same byte count, but not a float type
    one_line_failure(embed_image(broken(lie), photo), "ln_final.weight")


def test_missing_tensor(broken, photo):
    def lie(h):
        del h["transformer.resblocks.1.mlp.c_fc.bias"]
    one_line_failure(embed_image(broken(lie), photo),
                     "missing tensor 'transformer.resblocks.1.mlp.c_fc.bias'")


def test_header_length_past_the_end(model, tmp_path, photo):
    d = tmp_path / "m"
    shutil.copytree(model, d)
    st = d / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 4)
    st.write_bytes(bytes(raw))
    one_line_failure(embed_image(d, photo), "header")


def test_zero_byte_weights(model, tmp_path, photo):
    d = tmp_path / "m"
    shutil.copytree(model, d)
    (d / "model.safetensors").write_bytes(b"")
    one_line_failure(embed_image(d, photo), "model.safetensors")
