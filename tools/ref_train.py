#!/usr/bin/python3
"""ref_train.py: an independent PyTorch reference of one CLIP training step
(test time only; Debian's python3-torch).

Written from the CLIP paper / open_clip's recipe, not from clipdb's C code:
the model is tools/ref_clip.py's torch modules (nn.MultiheadAttention,
nn.LayerNorm, nn.Conv2d patch embedding; the text tower at the full context
with CLIP's causal mask, features at the argmax id), made trainable, plus a
logit_scale parameter. The step is what open_clip does:

  img = normalize(visual(pixels)); txt = normalize(text(ids))
  logits = exp(logit_scale) img @ txt^T
  loss = (CE(logits, arange) + CE(logits^T, arange)) / 2
  torch.optim.AdamW with two groups: decay for tensors with ndim >= 2
  (except logit_scale), none for the rest; then logit_scale.clamp_(0, ln 100)

Gradients and weights are reported under the names and shapes of the model
file's own key convention (OpenAI or Hugging Face): HF's q/k/v_proj are the
rows of in_proj, its projections the transposes.

    /usr/bin/python3 tools/ref_train.py MODEL_DIR BATCH.bin OUT.npz [--steps N]
        [--lr X] [--wd X]

BATCH.bin as tools/train_step.c reads it. OUT.npz holds grad/<name>,
param1/<name> (after one step) and losses (N).
"""
import argparse
import math
import os
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ref_clip  # noqa: E402


def read_batch(path):
    raw = pathlib.Path(path).read_bytes()
    n, S, C = np.frombuffer(raw[:12], "<i4")
    off = 12
    px = np.frombuffer(raw, "<f4", n * 3 * S * S, off).reshape(n, 3, S, S)
    off += px.nbytes
    ids = np.frombuffer(raw, "<i4", n * C, off).reshape(n, C)
    off += ids.nbytes
    lens = np.frombuffer(raw, "<i4", n, off)
    return px.copy(), ids.copy(), lens.copy()


def write_batch(path, pixels, ids_list, context=77):
    n = len(ids_list)
    ids = np.zeros((n, context), np.int32)
    lens = np.zeros(n, np.int32)
    for i, t in enumerate(ids_list):
        ids[i, :len(t)] = t
        lens[i] = len(t)
    with open(path, "wb") as f:
        f.write(np.array([n, pixels.shape[-1], context], "<i4").tobytes())
        f.write(np.ascontiguousarray(pixels, "<f4").tobytes())
        f.write(ids.astype("<i4").tobytes())
        f.write(lens.astype("<i4").tobytes())


def file_style(model_dir):
    d = pathlib.Path(model_dir)
    f = d / "model.safetensors"
    if not f.exists():
        f = d / "open_clip_model.safetensors"
    w = ref_clip.read_safetensors(f)
    return ("openai" if "visual.conv1.weight" in w else "hf"), w


def visual_keep(v, pixels, keep):
    """The image tower with open_clip's PatchDropout (exclude_first_token):
    after the position embedding, image i keeps its class token and the patch
    tokens keep[i] (grid indices), then ln_pre, the blocks, ln_post of the
    class token, the projection. keep None: every patch (v's own forward)."""
    if keep is None:
        return v(pixels)
    x = v.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, d)
    cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + v.positional_embedding     # (N, 1 + g*g, d)
    idx = torch.from_numpy(np.asarray(keep, np.int64)) + 1      # (N, K) token rows
    rows = torch.arange(x.shape[0])[:, None]
    x = torch.cat([x[:, :1], x[rows, idx]], dim=1)              # (N, 1 + K, d)
    x = v.ln_pre(x).permute(1, 0, 2)
    x = v.transformer(x).permute(1, 0, 2)
    return v.ln_post(x[:, 0, :]) @ v.proj


class Trainable(torch.nn.Module):
    def __init__(self, w_openai, logit_scale, smoothing=0.0, keep=None):
        super().__init__()
        self.smoothing = smoothing
        self.keep = keep
        self.clip = ref_clip.CLIP(w_openai)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale)))
        self.clip.train()

    def loss(self, pixels, ids):
        c = self.clip
        img = visual_keep(c.visual, pixels, self.keep)
        x = c.token_embedding(ids) + c.positional_embedding
        x = c.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = c.ln_final(x)
        txt = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ c.text_projection
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        labels = torch.arange(len(ids))
        ce = torch.nn.functional.cross_entropy
        return (ce(logits, labels, label_smoothing=self.smoothing) +
                ce(logits.t(), labels, label_smoothing=self.smoothing)) / 2

    def named(self):
        """{openai name: tensor} of the parameters (logit_scale included)."""
        out = {k: p for k, p in self.clip.named_parameters()}
        out["logit_scale"] = self.logit_scale
        return out


def to_style(d, style, w_file):
    """{openai name: array} -> {file name: array} in the file's convention: the
    mapping of ref_clip.to_openai_names, reversed."""
    if style == "openai":
        return {k: d[k] for k in w_file if k in d}
    out = {hf: d[oa] for hf, oa in ref_clip.HF_TO_OPENAI.items()}
    out["logit_scale"] = d["logit_scale"]
    out["visual_projection.weight"] = d["visual.proj"].T
    out["text_projection.weight"] = d["text_projection"].T
    for p, q in ref_clip.hf_layers(w_file):
        for a, b in ref_clip.HF_TO_OPENAI_LAYER:
            for kind in ("weight", "bias"):
                out[f"{p}{a}.{kind}"] = d[f"{q}{b}.{kind}"]
        for kind in ("weight", "bias"):
            parts = np.split(d[q + "attn.in_proj_" + kind], 3, axis=0)
            for x, part in zip("qkv", parts):
                out[p + f"self_attn.{x}_proj.{kind}"] = part
    return out


def run(model_dir, pixels, ids, steps=1, lr=1e-3, wd=0.2, betas=(0.9, 0.999), eps=1e-8,
        smoothing=0.0, keep=None):
    """Returns (grads at the initial weights, params after one step, losses),
    the first two as {file name: array}. keep (N, K): patch dropout."""
    torch.manual_seed(0)
    style, w_file = file_style(model_dir)
    w = ref_clip.to_openai_names(w_file)
    m = Trainable(w, float(np.asarray(w_file["logit_scale"]).reshape(-1)[0]), smoothing, keep)
    named = m.named()
    decay = [p for n, p in named.items() if p.ndim >= 2 and n != "logit_scale"]
    rest = [p for n, p in named.items() if not (p.ndim >= 2 and n != "logit_scale")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps, foreach=False)
    px = torch.from_numpy(pixels)
    tid = torch.from_numpy(ids.astype(np.int64))
    losses, grads, params1 = [], None, None
    for s in range(steps):
        opt.zero_grad(set_to_none=False)
        loss = m.loss(px, tid)
        loss.backward()
        if s == 0:
            grads = to_style({k: p.grad.detach().numpy().copy() for k, p in named.items()},
                             style, w_file)
        opt.step()
        with torch.no_grad():
            m.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss))
        if s == 0:
            params1 = to_style({k: p.detach().numpy().copy() for k, p in named.items()},
                               style, w_file)
    return grads, params1, np.array(losses)


def adamw_on(model_dir, grads, lr=1e-3, wd=0.2, betas=(0.9, 0.999), eps=1e-8, clip=0.0):
    """One torch.optim.AdamW step from the model file's weights with the given
    gradients ({file name: array}), after torch.nn.utils.clip_grad_norm_(clip)
    when clip > 0; returns {file name: array}."""
    style, w_file = file_style(model_dir)
    w = ref_clip.to_openai_names(w_file)
    m = Trainable(w, float(np.asarray(w_file["logit_scale"]).reshape(-1)[0]))
    g = dict(ref_clip.to_openai_names({k: np.asarray(v, np.float32) for k, v in grads.items()}))
    g["logit_scale"] = np.asarray(grads["logit_scale"], np.float32).reshape(())
    named = m.named()
    for k, p in named.items():
        p.grad = torch.from_numpy(np.ascontiguousarray(g[k]).reshape(p.shape).copy())
    decay = [p for n, p in named.items() if p.ndim >= 2 and n != "logit_scale"]
    rest = [p for n, p in named.items() if not (p.ndim >= 2 and n != "logit_scale")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps, foreach=False)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(list(named.values()), clip)
    opt.step()
    with torch.no_grad():
        m.logit_scale.clamp_(0, math.log(100))
    return to_style({k: p.detach().numpy().copy() for k, p in named.items()}, style, w_file)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("batch")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.2)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    px, ids, _ = read_batch(a.batch)
    g, p1, losses = run(a.model, px, ids, a.steps, a.lr, a.wd)
    arrs = {"grad/" + k: v for k, v in g.items()}
    arrs.update({"param1/" + k: v for k, v in p1.items()})
    arrs["losses"] = losses
    np.savez(a.out, **arrs)


if __name__ == "__main__":
    main()
