#!/usr/bin/python3
"""ref_clip.py: an independent PyTorch reference of CLIP (test time only).

Written from the architecture facts (shared/models/clip-vit-b-32/README.md)
and the shape of OpenAI's clip/model.py, not from clipdb's C code. It reads a
model directory's safetensors with its own small numpy reader (OpenAI or
Hugging Face key names; F32/F16/BF16), builds both towers as torch modules
(fp32) and computes the embeddings. The image tower is a ViT, or, when the
file has OpenAI's ModifiedResNet names (visual.layer1.0.conv1.weight: CLIP
RN50/RN101/RN50x4, OpenAI names only), a ResNet written from the architecture
(ModifiedResNet below), BatchNorm at its running statistics.

  texts:  the full 77-token sequence with CLIP's causal mask, features at the
          argmax of the ids (so it also checks clipdb's cut-off at the end token)
  images: PIL decode + exif_transpose, then CLIP's _transform:
          Resize(S, BICUBIC), CenterCrop(S), RGB, ToTensor, Normalize, with S the
          model's image size (224 for every ViT here; the ResNet's own).

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

def read_safetensors(path, ints=False):
    """Returns {name: float32 numpy array}; integer tensors are skipped, or,
    with ints, I64 ones returned as int64 arrays (BatchNorm's
    num_batches_tracked, which the ResNet's strict load wants)."""
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
        elif dt == "I64" and ints:
            out[name] = np.frombuffer(buf, dtype="<i8").reshape(shape).astype(np.int64)
            continue
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


class Bottleneck(nn.Module):
    """ModifiedResNet's block: 1x1, 3x3, 1x1 convolutions (no bias, each with
    a BatchNorm), the stride as an average pool before the last 1x1 (not a
    strided conv), and on the identity path, when the shape changes, average
    pool then 1x1 conv + BatchNorm."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.down_pool = None
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # state_dict names downsample.0 (conv) and .1 (bn): the pool has no
            # tensors, so it is kept outside the Sequential
            self.down_pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.pool(y)))
        identity = x if self.downsample is None else self.downsample(self.down_pool(x))
        return torch.relu(y + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention step whose only query is the mean of the grid's
    tokens; keys and values are that mean and every grid token, each with its
    positional embedding (q, k, v projections with biases, then c_proj)."""

    def __init__(self, grid, d, heads, embed):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, d))
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.c_proj = nn.Linear(d, embed)
        self.heads = heads

    def forward(self, x):  # x (N, C, H, W)
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1).permute(2, 0, 1)                 # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)   # (HW+1, N, C)
        x = x + self.positional_embedding[:, None, :]
        h, dh = self.heads, c // self.heads
        q = self.q_proj(x[:1]).reshape(1, n, h, dh)
        k = self.k_proj(x).reshape(-1, n, h, dh)
        v = self.v_proj(x).reshape(-1, n, h, dh)
        att = torch.einsum("qnhd,tnhd->nhqt", q, k) / dh ** 0.5
        o = torch.einsum("nhqt,tnhd->nqhd", att.softmax(dim=-1), v)  # (N, 1, h, dh)
        return self.c_proj(o.reshape(n, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: a 3-conv stem (stride 2, then average pool
    2), four stages of Bottlenecks (planes w, 2w, 4w, 8w; stride 2 from
    stage 2 on, in block 0), then AttentionPool2d instead of a global pool."""

    def __init__(self, width, layers, image, embed):
        super().__init__()
        h = width // 2
        self.conv1 = nn.Conv2d(3, h, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv2 = nn.Conv2d(h, h, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.conv3 = nn.Conv2d(h, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for s, n in enumerate(layers):
            planes = width << s
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(inplanes, planes, 2 if s > 0 and i == 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.attnpool = AttentionPool2d(image // 32, width * 32, width * 32 // 64, embed)

    def forward(self, x):  # x (N, 3, S, S)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 32w, S/32, S/32)
        return self.attnpool(x)


class CLIP(nn.Module):
    def __init__(self, w):
        super().__init__()
        if "visual.layer1.0.conv1.weight" in w:
            self._init_resnet(w)
            return
        vd = w["visual.conv1.weight"].shape[0]
        patch = w["visual.conv1.weight"].shape[2]
        grid = int(round((w["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        vl = len({k.split(".")[3] for k in w if k.startswith("visual.transformer.resblocks.")})
        td = w["ln_final.weight"].shape[0]
        tl = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
        embed = w["text_projection"].shape[1]
        self.image_size = grid * patch
        self.visual = Vision(vd, vl, patch, grid, embed)
        self._init_text(w, td, tl, embed)
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in w.items() if k != "logit_scale"
                 and v.dtype.kind != "i"}  # load_model reads int tensors: no ViT one is loaded
        self.load_state_dict(state, strict=True)
        self.eval()

    def _init_text(self, w, td, tl, embed):
        """The text tower (the same for either image tower): td wide, tl blocks."""
        self.context = w["positional_embedding"].shape[0]
        mask = torch.full((self.context, self.context), float("-inf")).triu_(1)
        self.transformer = Transformer(td, tl, td // 64, mask)
        self.token_embedding = nn.Embedding(w["token_embedding.weight"].shape[0], td)
        self.positional_embedding = nn.Parameter(torch.empty(self.context, td))
        self.ln_final = LayerNorm(td)
        self.text_projection = nn.Parameter(torch.empty(td, embed))

    def _init_resnet(self, w):
        """The ResNet image tower's shapes come from the tensors: width from
        layer1.0.conv1 (out = planes = width; the stem's conv1 has width/2),
        blocks per stage from the layerS.i indices, the image size from the
        attention pool's grid, embed from c_proj."""
        width = w["visual.layer1.0.conv1.weight"].shape[0]
        layers = [len({k.split(".")[2] for k in w if k.startswith(f"visual.layer{s}.")})
                  for s in range(1, 5)]
        grid = int(round((w["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5))
        embed = w["visual.attnpool.c_proj.weight"].shape[0]
        self.image_size = 32 * grid
        self.visual = ModifiedResNet(width, layers, self.image_size, embed)
        td = w["ln_final.weight"].shape[0]
        tl = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
        self._init_text(w, td, tl, embed)
        # (a 0-d array stays 0-d here: num_batches_tracked)
        state = {k: torch.from_numpy(np.ascontiguousarray(v).reshape(np.shape(v)))
                 for k, v in w.items() if k != "logit_scale"}
        # strict by hand first: BatchNorm's loader quietly makes up a missing
        # num_batches_tracked, and a wrong-shaped one fails with an index error
        want = {k: tuple(t.shape) for k, t in self.state_dict().items()}
        bad = sorted(set(want) ^ set(state)) + sorted(
            k for k in want if k in state and tuple(state[k].shape) != want[k])
        if bad:
            raise ValueError(f"ResNet CLIP: missing, unexpected or wrong-shaped tensors: {bad[:5]}")
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
    return CLIP(to_openai_names(read_safetensors(f, ints=True)))


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
