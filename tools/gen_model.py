#!/usr/bin/python3
"""gen_model.py: writes a CLIP model directory with seeded random weights in
the real file formats (test fixture generator; test time only).

    /usr/bin/python3 tools/gen_model.py OUTDIR \
        --size tiny|small|b32|rn-tiny|rn-small|rn50 \
        --keys openai|hf --dtype F32|F16|BF16 --seed N [--tokenizer bpe|hf]

OUTDIR gets model.safetensors and a tokenizer:
  --tokenizer bpe  bpe_simple_vocab_16e6.txt.gz (copied from the shared data)
  --tokenizer hf   vocab.json + merges.txt, laid out as Hugging Face's
                   CLIPTokenizer files (derived from the same merges file)
Default: bpe for --keys openai, hf for --keys hf.

The same --size/--seed gives the SAME mathematical model under both key
conventions: one canonical set of arrays (OpenAI layout) is generated, then
named, split (in_proj -> q/k/v) and transposed (projections) per convention.
Every tensor is rounded to --dtype from the same float32 values, so openai and
hf files of one seed and dtype hold bit-identical weights.

ViT sizes (heads = width / 64 always; image 224; context 77; vocab 49408):
  tiny   vision 64 x 2 layers, patch 32; text 64 x 2 layers; embed 32
  small  vision 128 x 3 layers, patch 32; text 128 x 3 layers; embed 64
  b32    ViT-B/32: vision 768 x 12, patch 32; text 512 x 12; embed 512

ResNet sizes: CLIP's ModifiedResNet image tower (as OpenAI's RN50/RN101/
RN50x4), OpenAI key names only (Hugging Face has no ResNet CLIP). width w:
stem w/2, w/2, w channels; stage s (1..4) has planes w * 2^(s-1), out channels
4 * planes; attention pool of width 32w, heads 32w / 64, over a grid of
(image / 32)^2 tokens + 1 (their mean). Text towers as the ViT sizes.
  rn-tiny   width 16, blocks 1,2,1,1, image 128 (grid 4), heads 8;
            text 64 x 2 layers; embed 32
  rn-small  width 32, blocks 2,1,2,1, image 160 (grid 5), heads 16;
            text 128 x 3 layers; embed 64
  rn50      RN50: width 64, blocks 3,4,6,3, image 224 (grid 7), heads 32;
            text 512 x 12; embed 1024
Each of the two small ones takes every path of the net: stage 1's block 0
has a stride-1 downsample (w in, 4w out), stages 2-4 a stride-2 one, and a
stage with 2+ blocks has blocks without one.

Initialisation follows OpenAI CLIP's initialize_parameters (attention std
width^-0.5, MLP/out-proj scaled by layers), with LayerNorm weights
1 + N(0, 0.05) and biases N(0, 0.02) so that a loader swapping weight and
bias, or q and k, changes the output. logit_scale = ln(100).
ResNet: convolutions N(0, fan_in^-1/2) (activations stay O(1): rms 0.3-1.2
after each stage of rn50 on a COCO photo, where He's sqrt(2) more grows them
to ~1000 through the residual sums); BatchNorm weight 1 + N(0, 0.1), bias
N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 1.5) (a forward that
ignores the running statistics fails), num_batches_tracked an I64 scalar (0;
--dtype converts float tensors only); attention pool (its positional
embedding included) std (32w)^-1/2, biases N(0, 0.02).

For tests of the loader's error messages (not for normal use):
  --drop NAME         leave the tensor NAME (final, per-convention name) out
  --bad-shape NAME    write NAME with its last dimension one shorter
"""
import argparse
import gzip
import json
import math
import os
import pathlib
import shutil
import struct
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CLIPDB_SHARED", str(ROOT.parent / "shared")))
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"

SIZES = {
    # name: (vision width, vision layers, patch, text width, text layers, embed)
    "tiny": (64, 2, 32, 64, 2, 32),
    "small": (128, 3, 32, 128, 3, 64),
    "b32": (768, 12, 32, 512, 12, 512),
}
RN_SIZES = {
    # name: (width, blocks per stage, image, text width, text layers, embed)
    # (images not under 128: clipdb decodes a JPEG at a reduced DCT scale
    # when its shorter side is 3x the target's, PIL never; from 128 on the
    # photos of the reference tests decode at full scale, so the two agree)
    "rn-tiny": (16, (1, 2, 1, 1), 128, 64, 2, 32),
    "rn-small": (32, (2, 1, 2, 1), 160, 128, 3, 64),
    "rn50": (64, (3, 4, 6, 3), 224, 512, 12, 1024),
}
IMAGE = 224  # ViT sizes; the ResNet sizes carry their own
CONTEXT = 77
VOCAB = 49408


# ---- canonical weights (OpenAI layout) -------------------------------------

def canonical(size, seed):
    """Returns an ordered list of (openai_name, float32 array); for a ResNet
    size also the BatchNorms' num_batches_tracked (int64 scalars)."""
    rng = np.random.default_rng(seed)
    out = []

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def ln(prefix, d):
        out.append((prefix + ".weight", (1.0 + normal((d,), 0.05)).astype(np.float32)))
        out.append((prefix + ".bias", normal((d,), 0.02)))

    def blocks(prefix, d, layers):
        attn_std = d ** -0.5
        proj_std = d ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * d) ** -0.5
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            ln(p + ".ln_1", d)
            out.append((p + ".attn.in_proj_weight", normal((3 * d, d), attn_std)))
            out.append((p + ".attn.in_proj_bias", normal((3 * d,), 0.02)))
            out.append((p + ".attn.out_proj.weight", normal((d, d), proj_std)))
            out.append((p + ".attn.out_proj.bias", normal((d,), 0.02)))
            ln(p + ".ln_2", d)
            out.append((p + ".mlp.c_fc.weight", normal((4 * d, d), fc_std)))
            out.append((p + ".mlp.c_fc.bias", normal((4 * d,), 0.02)))
            out.append((p + ".mlp.c_proj.weight", normal((d, 4 * d), proj_std)))
            out.append((p + ".mlp.c_proj.bias", normal((d,), 0.02)))

    if size in RN_SIZES:
        width, stages, image, tw, tl, embed = RN_SIZES[size]
        out += resnet(rng, width, stages, image, embed)
    else:
        # (the ViT path draws exactly as before the ResNet sizes existed, so
        # its files, and the fixtures made from them, stay byte-identical)
        vw, vl, patch, tw, tl, embed = SIZES[size]
        grid = IMAGE // patch
        vscale = vw ** -0.5
        out.append(("visual.conv1.weight", normal((vw, 3, patch, patch), (3 * patch * patch) ** -0.5)))
        out.append(("visual.class_embedding", normal((vw,), vscale)))
        out.append(("visual.positional_embedding", normal((grid * grid + 1, vw), vscale)))
        ln("visual.ln_pre", vw)
        blocks("visual.transformer", vw, vl)
        ln("visual.ln_post", vw)
        out.append(("visual.proj", normal((vw, embed), vscale)))

    out.append(("token_embedding.weight", normal((VOCAB, tw), 0.02)))
    out.append(("positional_embedding", normal((CONTEXT, tw), 0.01)))
    blocks("transformer", tw, tl)
    ln("ln_final", tw)
    out.append(("text_projection", normal((tw, embed), tw ** -0.5)))
    out.append(("logit_scale", np.array(math.log(100.0), dtype=np.float32)))
    return out


def resnet(rng, width, stages, image, embed):
    """The ModifiedResNet image tower's tensors, named as in OpenAI's
    clip/model.py state_dict ("visual." + ...), drawn from rng in order."""
    out = []

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def conv(name, cout, cin, k):
        # not He's sqrt(2 / fan_in): the ReLU's halving is made up by the
        # residual sums, and with He the activations grow ~4x per stage
        out.append((name, normal((cout, cin, k, k), (cin * k * k) ** -0.5)))

    def bn(prefix, d):
        # statistics away from the identity: a forward that skips them, or
        # mixes up mean and var, must not pass
        out.append((prefix + ".weight", (1.0 + normal((d,), 0.1)).astype(np.float32)))
        out.append((prefix + ".bias", normal((d,), 0.1)))
        out.append((prefix + ".running_mean", normal((d,), 0.1)))
        out.append((prefix + ".running_var", rng.uniform(0.5, 1.5, d).astype(np.float32)))
        out.append((prefix + ".num_batches_tracked", np.array(0, dtype=np.int64)))

    v = "visual."
    conv(v + "conv1.weight", width // 2, 3, 3)
    bn(v + "bn1", width // 2)
    conv(v + "conv2.weight", width // 2, width // 2, 3)
    bn(v + "bn2", width // 2)
    conv(v + "conv3.weight", width, width // 2, 3)
    bn(v + "bn3", width)
    inplanes = width
    for s, n in enumerate(stages):
        planes = width << s
        for i in range(n):
            p = f"{v}layer{s + 1}.{i}."
            stride = 2 if s > 0 and i == 0 else 1
            conv(p + "conv1.weight", planes, inplanes, 1)
            bn(p + "bn1", planes)
            conv(p + "conv2.weight", planes, planes, 3)
            bn(p + "bn2", planes)
            conv(p + "conv3.weight", planes * 4, planes, 1)
            bn(p + "bn3", planes * 4)
            if stride > 1 or inplanes != planes * 4:
                conv(p + "downsample.0.weight", planes * 4, inplanes, 1)
                bn(p + "downsample.1", planes * 4)
            inplanes = planes * 4

    d = width * 32  # = inplanes: stage 4's output channels
    grid = image // 32
    std = d ** -0.5
    a = v + "attnpool."
    out.append((a + "positional_embedding", normal((grid * grid + 1, d), std)))
    for proj in ("q_proj", "k_proj", "v_proj"):
        out.append((a + proj + ".weight", normal((d, d), std)))
        out.append((a + proj + ".bias", normal((d,), 0.02)))
    out.append((a + "c_proj.weight", normal((embed, d), std)))
    out.append((a + "c_proj.bias", normal((embed,), 0.02)))
    return out


# ---- naming per convention ---------------------------------------------------

def openai_tensors(canon):
    return list(canon)


def hf_block(prefix, rest, arr):
    """Maps 'N.<openai suffix>' of a resblock to HF names (list of pairs)."""
    n, suffix = rest.split(".", 1)
    p = f"{prefix}.encoder.layers.{n}"
    simple = {
        "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
        "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
        "attn.out_proj.weight": "self_attn.out_proj.weight",
        "attn.out_proj.bias": "self_attn.out_proj.bias",
        "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
        "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    }
    if suffix in simple:
        return [(f"{p}.{simple[suffix]}", arr)]
    if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if suffix.endswith("weight") else "bias"
        q, k, v = np.split(arr, 3, axis=0)
        return [(f"{p}.self_attn.q_proj.{kind}", q), (f"{p}.self_attn.k_proj.{kind}", k),
                (f"{p}.self_attn.v_proj.{kind}", v)]
    raise KeyError(suffix)


def hf_tensors(canon):
    fixed = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    out = []
    n_vpos = n_tpos = 0
    for name, arr in canon:
        if name in fixed:
            out.append((fixed[name], arr))
            if name == "visual.positional_embedding":
                n_vpos = arr.shape[0]
            if name == "positional_embedding":
                n_tpos = arr.shape[0]
        elif name == "visual.proj":
            out.append(("visual_projection.weight", np.ascontiguousarray(arr.T)))
        elif name == "text_projection":
            out.append(("text_projection.weight", np.ascontiguousarray(arr.T)))
        elif name.startswith("visual.transformer.resblocks."):
            out += hf_block("vision_model", name[len("visual.transformer.resblocks."):], arr)
        elif name.startswith("transformer.resblocks."):
            out += hf_block("text_model", name[len("transformer.resblocks."):], arr)
        else:
            raise KeyError(name)
    # HF checkpoints carry these buffers; a loader must ignore them.
    out.append(("vision_model.embeddings.position_ids", np.arange(n_vpos, dtype=np.int64)[None, :]))
    out.append(("text_model.embeddings.position_ids", np.arange(n_tpos, dtype=np.int64)[None, :]))
    return out


# ---- safetensors writer --------------------------------------------------------

def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(a)
    rounded[nan] = (bits[nan] >> 16) | 0x40  # keep NaN a (quiet) NaN
    return rounded.astype(np.uint16)


def encode(arr, dtype):
    """Returns (safetensors dtype name, little-endian bytes)."""
    if arr.dtype == np.int64:
        return "I64", arr.astype("<i8").tobytes()
    if dtype == "F32":
        return "F32", arr.astype("<f4").tobytes()
    if dtype == "F16":
        return "F16", arr.astype("<f2").tobytes()
    if dtype == "BF16":
        return "BF16", to_bf16_bits(arr).astype("<u2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype, metadata=None):
    """tensors: list of (name, array). Layout as the reference writer: header
    padded with spaces to a multiple of 8, then the data in header order."""
    enc = []
    for name, arr in tensors:
        dt, raw = encode(arr, dtype)
        enc.append((name, dt, list(arr.shape), raw))
    # The reference writer orders by alignment (largest itemsize first), then name.
    size = {"I64": 8, "F32": 4, "F16": 2, "BF16": 2}
    enc.sort(key=lambda t: (-size[t[1]], t[0]))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, dt, shape, raw in enc:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, _, _, raw in enc:
            f.write(raw)


# ---- tokenizer files ------------------------------------------------------------

def bytes_to_unicode():
    """The byte-level symbol table of GPT-2 / CLIP (byte -> printable char)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(outdir, kind):
    src = SHARED / "models" / "clip-vit-b-32" / BPE_NAME
    if not src.is_file():
        sys.exit(f"gen_model.py: {src} not found: the shared data (../shared or $CLIPDB_SHARED) "
                 "is needed for the tokenizer files")
    if kind == "bpe":
        shutil.copyfile(src, outdir / BPE_NAME)
        return
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    assert len(merges) == 48894
    sym = bytes_to_unicode()
    vocab = sym + [s + "</w>" for s in sym]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB
    with open(outdir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(outdir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(m + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("outdir")
    ap.add_argument("--size", choices=sorted(SIZES) + sorted(RN_SIZES), default="tiny")
    ap.add_argument("--keys", choices=["openai", "hf"], default="openai")
    ap.add_argument("--dtype", choices=["F32", "F16", "BF16"], default="F32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", choices=["bpe", "hf", "none"], default=None)
    ap.add_argument("--drop", action="append", default=[], metavar="NAME",
                    help="leave tensor NAME out (for loader error tests)")
    ap.add_argument("--bad-shape", action="append", default=[], metavar="NAME",
                    help="write NAME with its last dimension one shorter (for loader error tests)")
    a = ap.parse_args()

    if a.size in RN_SIZES and a.keys != "openai":
        sys.exit(f"gen_model.py: --size {a.size} is a ResNet CLIP, which exists only with "
                 "OpenAI key names (--keys openai): Hugging Face has no ResNet CLIP")

    outdir = pathlib.Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    canon = canonical(a.size, a.seed)
    tensors = openai_tensors(canon) if a.keys == "openai" else hf_tensors(canon)
    names = {n for n, _ in tensors}
    for n in a.drop + a.bad_shape:
        if n not in names:
            sys.exit(f"gen_model.py: no tensor named {n!r} in a {a.keys} model")
    tensors = [(n, t) for n, t in tensors if n not in a.drop]
    tensors = [(n, (t[..., :-1] if t.ndim else t.reshape(1)[:0]) if n in a.bad_shape else t)
               for n, t in tensors]
    write_safetensors(outdir / "model.safetensors", tensors, a.dtype, {"format": "pt"})
    tok = a.tokenizer or ("bpe" if a.keys == "openai" else "hf")
    if tok != "none":
        write_tokenizer(outdir, tok)


if __name__ == "__main__":
    main()
