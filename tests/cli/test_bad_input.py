"""The bad-input list of the encoder issue, end to end through `clipdb embed`.

Each case must give exactly one line on stderr ("clipdb embed: ..."), exit
status 1, and no sanitizer report (`make asan` runs this file again under
ASan+UBSan), and the line must name the input AND the reason. Unit tests
cover the parsers in more depth; this file proves the user sees a clear
message for every item of the list. (test_embed.py covers embed's good paths.)

The lying-header cases need no shared data: their model has no tokenizer
(loading stops at the weights) and their image is made here.
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
def weights_only(tmp_path_factory):
    """The same tiny model without tokenizer files: enough for cases that
    fail while loading the weights (no ../shared needed)."""
    return gen_model(tmp_path_factory.mktemp("bad") / "weights", "tiny", "openai", "F32", 5,
                     "--tokenizer", "none")


@pytest.fixture(scope="module")
def photo(shared):
    return sorted((shared / "data" / "coco-subset" / "images").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    """A small valid PNG made here (no ../shared needed)."""
    p = tmp_path_factory.mktemp("img") / "small.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(p)
    return p


def one_line_failure(p, *needles):
    return conftest.one_line_failure(p, "embed", *needles)


def embed_image(model, path):
    return run("embed", "--model", model, "--image", path)


# ---- images -----------------------------------------------------------------

def test_missing_file(model, tmp_path):
    one_line_failure(embed_image(model, tmp_path / "absent.jpg"), "absent.jpg",
                     "No such file")


def test_zero_byte_file(model, tmp_path):
    p = tmp_path / "zero.png"
    p.write_bytes(b"")
    one_line_failure(embed_image(model, p), "zero.png", "empty")


def test_truncated_jpeg(model, photo, tmp_path):
    data = photo.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    one_line_failure(embed_image(model, p), "cut.jpg", "corrupt JPEG data")


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
    one_line_failure(p, 'text "na', "not valid UTF-8")


def test_empty_text(model):
    one_line_failure(run("embed", "--model", model, "--text", ""), 'text ""', "empty text")


def test_ten_thousand_character_text(model):
    text = ("the quick brown fox " * 500)[:10_000]
    # alone and inside a batch: the line names this text (an excerpt), the
    # reason (its length in tokens against the context) and the CLI's hint
    for args in (("--text", text), ("--text", "ok", "--text", text)):
        one_line_failure(run("embed", "--model", model, *args), 'text "the quick brown fox',
                         "2002 tokens long", "holds 77", "--truncate")
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
def broken(weights_only, tmp_path):
    """A copy of the model directory whose header a test rewrites."""
    d = tmp_path / "broken"
    shutil.copytree(weights_only, d)
    st = d / "model.safetensors"
    header, data = read_safetensors(st)

    def rewrite(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        write_safetensors(st, h, data)
        return d
    return rewrite


def test_offsets_past_the_end(broken, png):
    def lie(h):
        t = h["visual.proj"]
        t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0] + 10**12]
    one_line_failure(embed_image(broken(lie), png), "model.safetensors", "visual.proj",
                     "past the end")


def test_overlapping_tensors(broken, png):
    def lie(h):
        # text_projection claims the bytes of visual.proj (same size: 64 x 32 floats)
        h["text_projection"]["data_offsets"] = list(h["visual.proj"]["data_offsets"])
    one_line_failure(embed_image(broken(lie), png), "model.safetensors", "overlap")


def test_wrong_dtype(broken, png):
    def lie(h):
        h["ln_final.weight"]["dtype"] = "I64"  # 8-byte ints: the byte count no longer fits
    one_line_failure(embed_image(broken(lie), png), "ln_final.weight")


def test_wrong_dtype_same_size(broken, png):
    def lie(h):
        h["ln_final.weight"]["dtype"] = "I32"  # same byte count, but not a float type
    one_line_failure(embed_image(broken(lie), png), "ln_final.weight")


def test_missing_tensor(broken, png):
    def lie(h):
        del h["transformer.resblocks.1.mlp.c_fc.bias"]
    one_line_failure(embed_image(broken(lie), png),
                     "missing tensor 'transformer.resblocks.1.mlp.c_fc.bias'")


def test_header_length_past_the_end(weights_only, tmp_path, png):
    d = tmp_path / "m"
    shutil.copytree(weights_only, d)
    st = d / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 4)
    st.write_bytes(bytes(raw))
    one_line_failure(embed_image(d, png), "model.safetensors", "header")


def test_zero_byte_weights(weights_only, tmp_path, png):
    d = tmp_path / "m"
    shutil.copytree(weights_only, d)
    (d / "model.safetensors").write_bytes(b"")
    one_line_failure(embed_image(d, png), "model.safetensors", "empty")


def test_garbage_weights(weights_only, tmp_path, png):
    d = tmp_path / "m"
    shutil.copytree(weights_only, d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    one_line_failure(embed_image(d, png), "model.safetensors", "header")


def test_no_model_directory(tmp_path, png):
    one_line_failure(embed_image(tmp_path / "no-such-dir", png), "no-such-dir",
                     "no model.safetensors")
