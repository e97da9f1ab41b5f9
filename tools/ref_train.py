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

A ResNet image tower (CLIP's ModifiedResNet, OpenAI names only: the file has
visual.layer1.0.conv1.weight) trains as open_clip trains it, the module in
train mode: every BatchNorm normalises with its batch's mean and biased
variance over (N, H, W) (eps 1e-5), and each forward moves running_mean /
running_var by momentum 0.1 towards the batch's mean and UNBIASED variance
(torch.nn.BatchNorm2d.train()). The running statistics are buffers, not
parameters: they are reported with gradient 0, and params1 holds them after
step 1's forward (one update); AdamW never touches them. num_batches_tracked
is not reported (momentum 0.1 does not use it). The decay rule is the ViT's
(conv weights and attnpool.positional_embedding decay; BatchNorm gains and
biases, attention pool biases do not). Patch dropout is ViT only.

    /usr/bin/python3 tools/ref_train.py MODEL_DIR BATCH.bin OUT.npz [--steps N]
        [--lr X] [--wd X]

BATCH.bin as tools/train_step.c reads it. OUT.npz holds grad/<name>,
param1/<name> (after one step) and losses (N).
"""
import argparse
import contextlib
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
    # ints: a ResNet's num_batches_tracked, which its strict load wants (the
    # ViT and Hugging Face paths pick float tensors by name and ignore them)
    w = ref_clip.read_safetensors(f, ints=True)
    return ("openai" if "visual.conv1.weight" in w else "hf"), w


def visual_keep(v, pixels, keep):
    """The image tower with open_clip's PatchDropout (exclude_first_token):
    after the position embedding, image i keeps its class token and the patch
    tokens keep[i] (grid indices), then ln_pre, the blocks, ln_post of the
    class token, the projection. keep None: every patch (v's own forward)."""
    if keep is None:
        return v(pixels)
    if not isinstance(v, ref_clip.Vision):
        raise ValueError("patch dropout applies to ViT image towers only")
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
        """ids: K rows per image (K = len(ids) / len(pixels)), row k*n + i
        a caption of image i: the mean over k of the symmetric loss of the n
        images against texts k*n .. k*n + n - 1 (K = 1: CLIP's loss)."""
        c = self.clip
        img = visual_keep(c.visual, pixels, self.keep)
        x = c.token_embedding(ids) + c.positional_embedding
        x = c.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = c.ln_final(x)
        txt = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ c.text_projection
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        n = img.shape[0]
        labels = torch.arange(n)
        ce = torch.nn.functional.cross_entropy
        total = 0
        for k in range(len(ids) // n):
            logits = self.logit_scale.exp() * img @ txt[k * n:(k + 1) * n].t()
            total = total + (ce(logits, labels, label_smoothing=self.smoothing) +
                             ce(logits.t(), labels, label_smoothing=self.smoothing)) / 2
        return total / (len(ids) // n)

    def named(self):
        """{openai name: tensor} of the parameters (logit_scale included)."""
        out = {k: p for k, p in self.clip.named_parameters()}
        out["logit_scale"] = self.logit_scale
        return out

    def stats(self):
        """{openai name: buffer} of the BatchNorms' running_mean / running_var
        (a ResNet image tower; none in a ViT). Each training forward updates
        them in place; num_batches_tracked is left out."""
        return {k: b for k, b in self.clip.named_buffers()
                if k.endswith(".running_mean") or k.endswith(".running_var")}


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
    the first two as {file name: array}. keep (N, K): patch dropout. A ResNet's
    BatchNorm running statistics are in both: gradient 0, and in params1 as
    step 1's forward left them."""
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
            g = {k: p.grad.detach().numpy().copy() for k, p in named.items()}
            g.update({k: np.zeros(b.shape, np.float32) for k, b in m.stats().items()})
            grads = to_style(g, style, w_file)
        opt.step()
        with torch.no_grad():
            m.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss))
        if s == 0:
            p1 = {k: p.detach().numpy().copy() for k, p in named.items()}
            p1.update({k: b.detach().numpy().copy() for k, b in m.stats().items()})
            params1 = to_style(p1, style, w_file)
    return grads, params1, np.array(losses)


@contextlib.contextmanager
def relu_tape():
    """Records (input, output) of every torch.relu call made inside the block
    (ref_clip's ResNet calls torch.relu; nothing else in the model does)."""
    tape = []
    real = torch.relu

    def relu(x):
        y = real(x)
        tape.append((x, y))
        return y
    torch.relu = relu
    try:
        yield tape
    finally:
        torch.relu = real


def relu_flip_fit(model_dir, pixels, ids, grads, tau=1e-3, probes=16, least=1e-9, tries=200):
    """run()'s gradient at the initial weights, corrected for the ReLU inputs
    that another float32 computation of it (grads, {file name: array}: the C
    engine's) rounds to the other side of 0.

    Why: a ReLU's derivative jumps at 0, so a ResNet's gradient is not a
    continuous function of the rounding. An input within float32 error of 0
    takes mask 1 in one computation and 0 in the other, and the gradient of
    every tensor before it moves by that one element's share, about
    1/sqrt(elements of the layer): 1e-3 to 1e-2 relative in rn-tiny, far
    above the 1e-4 the comparison wants. torch's own float32 forward is
    within 1e-5 of the layer's rms of float64 (rn-tiny), and on one thread
    puts 1 (rn-tiny) or 2 (rn-small) inputs on the other side of 0: its
    gradient is 2.5e-3 / 2e-3 from the float64 one, 5e-6 / 7e-6 after those
    flips (on two threads other inputs, or none).

    Flipping input x_e changes the gradient by exactly
        v_e = sigma * dL/dy_e * dx_e/dtheta
    (sigma -1 when the reference had x_e > 0, else +1; y_e the ReLU's
    output). Distances are sum over tensors of ||difference||^2 /
    ||reference||^2 (each tensor counts by its relative error, as the
    comparison does); <.,.> is its inner product and delta = grads -
    reference. If grads made flip e, <delta, v_e> ~ ||v_e||^2.

    The search (a matching pursuit whose atoms are whole flips): for every
    input at once, <delta, v_e> = sigma dL/dy_e (J u)_e with J the Jacobian
    of the ReLU inputs in the weights and u the weighted delta (one
    Jacobian-vector product, by double backward), and ||v_e||^2 is
    estimated as (dL/dy_e)^2 E[(J z)_e^2] over `probes` random z
    (Hutchinson). The input with the largest estimated fall of the distance,
    2 <delta, v_e> - ||v_e||^2 (above `least`), among those within a window
    of 0 (1e-5, then 1e-4, then tau times the layer's rms: nearer inputs
    flip more often) is tried with its exact v_e (one partial backward): it
    is added to the reference when <delta, v_e> / ||v_e||^2 is within 0.7 to
    1.5 (a flip enters with coefficient 1; the rest is the other flips'
    overlap), delta moves with it and J u is recomputed. At most `tries`
    inputs are tried. Only whole flips of single inputs are added, so a
    wrong gradient is not explained away: a few rank-one corrections of
    fixed size cannot absorb an error spread over a tensor. (torch's
    channels_last path, whose BatchNorm sums its batch statistics less
    exactly (batch mean 6e-6 relative off where the contiguous kernel is
    4e-8 off) and whose forward is 2e-4 of the rms from float64, still fails
    by 1e-3 after the fit: the comparison wants BatchNorm's sums accurate.)

    Returns (corrected gradient {file name: array}, flips added as
    [(ReLU call, flat index, |x_e| / rms)], inputs tried). A ViT has no
    ReLU: its gradient comes back unchanged."""
    style, w_file = file_style(model_dir)
    w = ref_clip.to_openai_names(w_file)
    m = Trainable(w, float(np.asarray(w_file["logit_scale"]).reshape(-1)[0]))
    named = m.named()
    with relu_tape() as tape:
        loss = m.loss(torch.from_numpy(pixels), torch.from_numpy(ids.astype(np.int64)))
    for _, y in tape:
        y.retain_grad()
    loss.backward(retain_graph=True)
    # dL/dy now: the retain_grad hooks also fire in the autograd.grad calls below
    dldy = [y.grad.detach().double().flatten().clone() for _, y in tape]
    ref = {k: p.grad.detach().double() for k, p in named.items()}
    if not tape:
        return grads_of(ref, m, style, w_file), [], 0
    ours = ref_clip.to_openai_names({k: np.asarray(v, np.float64) for k, v in grads.items()})
    ours["logit_scale"] = np.asarray(grads["logit_scale"], np.float64)
    delta = {k: torch.from_numpy(np.ascontiguousarray(ours[k]).reshape(r.shape)) - r
             for k, r in ref.items()}
    gnorm = math.sqrt(sum(float((r ** 2).sum()) for r in ref.values()))
    # (a tensor whose true gradient is 0, the attention pool's key bias, does not count)
    weight = {k: 1.0 / float((r ** 2).sum()) if float(r.norm()) > 1e-9 * gnorm else 0.0
              for k, r in ref.items()}
    names = [k for k in named if k.startswith("visual.")]
    params = [named[k] for k in names]

    # J v by double backward: g(lam) = J^T lam is linear in lam, d<g(lam), v>/dlam = J v
    lams = [torch.zeros_like(x, requires_grad=True) for x, _ in tape]
    jt = torch.autograd.grad(sum((lam * x).sum() for lam, (x, _) in zip(lams, tape)), params,
                             create_graph=True, allow_unused=True)

    def jvp(vec):
        t = sum((g * vec[k].to(g.dtype)).sum() for k, g in zip(names, jt) if g is not None)
        out = torch.autograd.grad(t, lams, retain_graph=True, allow_unused=True)
        return [torch.zeros(x.numel(), dtype=torch.float64) if j is None
                else j.detach().double().flatten() for j, (x, _) in zip(out, tape)]

    # ||v_e||^2 of every input, estimated with z_k ~ N(0, weight_k) per tensor
    gen = torch.Generator().manual_seed(0)
    vv_est = [torch.zeros(x.numel(), dtype=torch.float64) for x, _ in tape]
    for _ in range(probes):
        jz = jvp({k: torch.randn(named[k].shape, generator=gen, dtype=torch.float64)
                  * math.sqrt(weight[k]) for k in names})
        vv_est = [a + dldy[c] ** 2 * b ** 2 / probes for c, (a, b) in enumerate(zip(vv_est, jz))]
    sigma = [1.0 - 2.0 * (x.detach().flatten() > 0).double() for x, _ in tape]
    near = [x.detach().flatten().abs() / float(x.detach().double().pow(2).mean().sqrt())
            for x, _ in tape]
    used, tried = [], set()
    for window in (1e-5, 1e-4, tau):
        ju = jvp({k: weight[k] * delta[k] for k in names})
        while len(tried) < tries:
            best, at = least, None
            for c in range(len(tape)):
                gain = 2 * sigma[c] * dldy[c] * ju[c] - vv_est[c]
                gain[near[c] >= window] = -math.inf
                for cc, e in tried:
                    if cc == c:
                        gain[e] = -math.inf
                e = int(gain.argmax())
                if float(gain[e]) > best:
                    best, at = float(gain[e]), (c, e)
            if at is None:
                break
            tried.add(at)
            c, e = at
            x, _ = tape[c]
            dx = torch.autograd.grad(x.flatten()[e], params, retain_graph=True, allow_unused=True)
            v = {k: float(sigma[c][e] * dldy[c][e]) * g.double()
                 for k, g in zip(names, dx) if g is not None}
            dot = sum(weight[k] * float((delta[k] * g).sum()) for k, g in v.items())
            vv = sum(weight[k] * float((g * g).sum()) for k, g in v.items())
            if 0.7 * vv < dot < 1.5 * vv:
                for k, g in v.items():
                    delta[k] -= g
                    ref[k] += g
                used.append((c, e, float(near[c][e])))
                ju = jvp({k: weight[k] * delta[k] for k in names})
    return grads_of(ref, m, style, w_file), used, len(tried)


def grads_of(ref, m, style, w_file):
    """{openai name: tensor} of the parameters' gradients -> {file name:
    float32 array}, the running statistics' zeros added."""
    out = {k: t.float().numpy() for k, t in ref.items()}
    out.update({k: np.zeros(b.shape, np.float32) for k, b in m.stats().items()})
    return to_style(out, style, w_file)


def adamw_on(model_dir, grads, lr=1e-3, wd=0.2, betas=(0.9, 0.999), eps=1e-8, clip=0.0):
    """One torch.optim.AdamW step from the model file's weights with the given
    gradients ({file name: array}), after torch.nn.utils.clip_grad_norm_(clip)
    when clip > 0; returns {file name: array} of the parameters. A ResNet's
    running statistics are not in it (no forward runs here, and only a
    forward moves them; their gradients in grads, 0, are ignored)."""
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
