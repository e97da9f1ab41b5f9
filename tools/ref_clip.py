#!/usr/bin/python3
"""ref_clip.py: an independent PyTorch reference of CLIP (test time only).

Written from the architecture facts (shared/models/clip-vit-b-32/README.md)
and the shape of OpenAI's clip/model.py, not from clipdb's C code. It reads a
model directory's safetensors with its own small numpy reader (OpenAI or
Hugging Face key names; F32/F16/BF16), builds both towers as torch modules
(fp32) and computes the embeddings:

  texts:  the full 77-token sequence with CLIP's causal mask, features at the
          argmax of the ids (so it also checks clipdb's cut-off at the end token)
  images: PIL decode + exif_transpose, then CLIP's _transform:
          Resize(224, BICUBIC), CenterCrop(224), RGB, ToTensor, Normalize.

    /usr/bin/python3 tools/ref_clip.py MODEL_DIR [--text T]... [--image P]... [--ids 49406,...]

prints one JSON line per input: {"type", "input", "embedding"}.
Token ids come from tools/ref_tokenizer.py when it exists, else from
`clipdb tokenize` ($CLIPDB_BIN); token_source() says which.
"""
import argparse
import json
import os
import pathlib
import struct
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from torchvision import transforms

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT = 77


# ---- safetensors (own reader) -------------------------------------------------

def read_safetensors(path):
    """Returns {name: float32 numpy array} (integer tensors are skipped)."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a:base + b]
        dt, shape = info["dtype"], tuple(info["shape"])
        if dt == "F32":
            arr = np.frombuffer(buf, dtype="<f4")
        elif dt == "F16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            continue
        out[name] = arr.reshape(shape).astype(np.float32)
    return out


# The tensors whose Hugging Face CLIPModel name maps one to one onto an OpenAI
# name (ref_train.py maps them back).
HF_TO_OPENAI = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
# Per transformer layer: (Hugging Face part, OpenAI part) of the one-to-one
# tensors (each has .weight and .bias); q, k and v are packed into in_proj.
HF_TO_OPENAI_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                      ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def hf_layers(w):
    """(Hugging Face prefix, OpenAI prefix) of every transformer layer of both towers
    present in w, a dict with Hugging Face names."""
    for hf, oa in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        i = 0
        while f"{hf}.encoder.layers.{i}.layer_norm1.weight" in w:
            yield f"{hf}.encoder.layers.{i}.", f"{oa}.resblocks.{i}."
            i += 1


def to_openai_names(w):
    """Hugging Face CLIPModel names -> OpenAI names (in_proj packed, projections (d, e))."""
    if "visual.conv1.weight" in w:
        return w
    o = {oa: w[hf] for hf, oa in HF_TO_OPENAI.items()}
    o["visual.proj"] = w["visual_projection.weight"].T
    o["text_projection"] = w["text_projection.weight"].T
    for p, q in hf_layers(w):
        for a, b in HF_TO_OPENAI_LAYER:
            for kind in ("weight", "bias"):
                o[f"{q}{b}.{kind}"] = w[f"{p}{a}.{kind}"]
        for kind in ("weight", "bias"):
            o[q + "attn.in_proj_" + kind] = np.concatenate(
                [w[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"], axis=0)
    return o


# ---- the model (as OpenAI's clip/model.py) --------------------------------------

class LayerNorm(nn.LayerNorm):
    pass


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = LayerNorm(d)
        self.mask = mask

    def forward(self, x):  # x (L, N, d)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(d, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class Vision(nn.Module):
    def __init__(self, d, layers, patch, grid, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, d))
        self.ln_pre = LayerNorm(d)
        self.transformer = Transformer(d, layers, d // 64)
        self.ln_post = LayerNorm(d)
        self.proj = nn.Parameter(torch.empty(d, embed))

    def forward(self, x):  # x (N, 3, S, S)
        x = self.conv1(x)                                # (N, d, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, d)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (N, T, d)
        x = self.ln_pre(x).permute(1, 0, 2)             # (T, N, d)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, w):
        super().__init__()
        vd = w["visual.conv1.weight"].shape[0]
        patch = w["visual.conv1.weight"].shape[2]
        grid = int(round((w["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        vl = len({k.split(".")[3] for k in w if k.startswith("visual.transformer.resblocks.")})
        td = w["ln_final.weight"].shape[0]
        tl = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
        embed = w["text_projection"].shape[1]
        self.image_size = grid * patch
        self.visual = Vision(vd, vl, patch, grid, embed)
        self.context = w["positional_embedding"].shape[0]
        mask = torch.full((self.context, self.context), float("-inf")).triu_(1)
        self.transformer = Transformer(td, tl, td // 64, mask)
        self.token_embedding = nn.Embedding(w["token_embedding.weight"].shape[0], td)
        self.positional_embedding = nn.Parameter(torch.empty(self.context, td))
        self.ln_final = LayerNorm(td)
        self.text_projection = nn.Parameter(torch.empty(td, embed))
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in w.items() if k != "logit_scale"}
        self.load_state_dict(state, strict=True)
        self.eval()

    @torch.no_grad()
    def encode_image(self, x):
        return self.visual(x)

    @torch.no_grad()
    def encode_text(self, ids):  # ids (N, 77) long, zero-padded
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def load_model(model_dir):
    d = pathlib.Path(model_dir)
    f = d / "model.safetensors"
    if not f.exists():
        f = d / "open_clip_model.safetensors"
    return CLIP(to_openai_names(read_safetensors(f)))


def preprocess(size):
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        lambda im: im.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def load_image(path, size):
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return preprocess(size)(im)


def encode_images(model, paths, batch=32):
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([load_image(p, model.image_size) for p in paths[i:i + batch]])
        out.append(model.encode_image(x))
    return torch.cat(out).float().numpy() if out else np.zeros((0, 0), np.float32)


# ---- token ids ----------------------------------------------------------------------

def token_source():
    if (ROOT / "tools" / "ref_tokenizer.py").exists():
        return "tools/ref_tokenizer.py"
    return "clipdb tokenize"


def bpe_file(model_dir):
    p = pathlib.Path(model_dir) / "bpe_simple_vocab_16e6.txt.gz"
    if p.exists():
        return p
    shared = pathlib.Path(os.environ.get("CLIPDB_SHARED", str(ROOT.parent / "shared")))
    return shared / "models" / "clip-vit-b-32" / "bpe_simple_vocab_16e6.txt.gz"


def tokenize(texts, model_dir, truncate=False):
    """Lists of token ids (start and end included), from token_source()."""
    if token_source() == "tools/ref_tokenizer.py":
        sys.path.insert(0, str(ROOT / "tools"))
        import ref_tokenizer  # noqa: E402  (the tokenizer module's Python reference)
        tok = ref_tokenizer.Tokenizer(str(bpe_file(model_dir)))
        return [tok.tokenize(t, CONTEXT, truncate) for t in texts]
    binary = os.environ.get("CLIPDB_BIN", str(ROOT / "build" / "clipdb"))
    ids = []
    for t in texts:
        p = subprocess.run([binary, "tokenize", "--model", str(model_dir), "--json", t],
                           capture_output=True, text=True, check=True)
        ids.append(json.loads(p.stdout.strip().splitlines()[-1])["ids"])
    return ids


def encode_ids(model, ids_list, batch=64):
    out = []
    for i in range(0, len(ids_list), batch):
        chunk = ids_list[i:i + batch]
        ids = torch.zeros(len(chunk), model.context, dtype=torch.long)
        for j, t in enumerate(chunk):
            if len(t) > model.context:  # CLIP's truncate=True
                t = list(t[:model.context - 1]) + [t[-1]]
            ids[j, :len(t)] = torch.tensor(t)
        out.append(model.encode_text(ids))
    return torch.cat(out).float().numpy() if out else np.zeros((0, 0), np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", action="append", default=[])
    ap.add_argument("--image", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    m = load_model(a.model)
    if a.text:
        for t, v in zip(a.text, encode_ids(m, tokenize(a.text, a.model))):
            print(json.dumps({"type": "text", "input": t, "embedding": v.tolist()}))
    if a.image:
        for p, v in zip(a.image, encode_images(m, a.image)):
            print(json.dumps({"type": "image", "input": p, "embedding": v.tolist()}))


if __name__ == "__main__":
    main()
