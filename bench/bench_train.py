#!/usr/bin/python3
"""bench_train.py: one full-size ViT-B/32 training step (forward + backward of
both towers, the contrastive loss, AdamW), batch 32: the C engine
(build/bench/bench_train) against PyTorch (Debian's python3-torch, 2
threads) doing the same step, in one run.

    /usr/bin/python3 bench/bench_train.py [--batch 32] [--steps 5] [--tokens 20] [--model DIR]
                                          [--precision fp32,bf16]

Weights: tools/gen_model.py --size b32 --seed 1 (generated into a temporary
directory unless --model is given). Both sides get a seeded random batch of
the same shape: pixels (32, 3, 224, 224) and texts of --tokens ids. PyTorch
runs tools/ref_train.py's model (nn.MultiheadAttention etc.) on the texts cut
to --tokens positions, as the C engine does (a stronger baseline than CLIP's
77-position padding), fp32, torch.optim.AdamW. One warm-up step each,
excluded; medians of --steps. The verification: both losses fall on the
repeated batch, and their first losses are printed (different random
batches, so they are not equal). Peak memory: ru_maxrss of each process.
Prints the CPU model and ISA; the ratio is C pairs/s over PyTorch pairs/s.
"""
import argparse
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def cpu_facts():
    model, flags = platform.processor(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model.strip():
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return model, isa


def torch_step(model_dir, batch, steps, tokens, precision="fp32"):
    import numpy as np
    import torch
    import ref_clip
    import ref_train
    torch.set_num_threads(2)
    torch.manual_seed(1)
    _, w_file = ref_train.file_style(model_dir)
    m = ref_train.Trainable(ref_clip.to_openai_names(w_file), 4.6052)
    named = m.named()
    decay = [p for n, p in named.items() if p.ndim >= 2 and n != "logit_scale"]
    rest = [p for n, p in named.items() if not (p.ndim >= 2 and n != "logit_scale")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-5)
    g = torch.Generator().manual_seed(1)
    px = torch.rand(batch, 3, 224, 224, generator=g) * 4 - 2
    ids = torch.randint(0, 40000, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    c = m.clip
    mask = torch.full((tokens, tokens), float("-inf")).triu_(1)
    for blk in c.transformer.resblocks:
        blk.mask = mask

    def loss_fn():
        img = c.visual(px)
        x = c.token_embedding(ids) + c.positional_embedding[:tokens]
        x = c.ln_final(c.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        txt = x[:, -1] @ c.text_projection
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = m.logit_scale.exp() * img @ txt.t()
        lab = torch.arange(batch)
        return (torch.nn.functional.cross_entropy(logits, lab) +
                torch.nn.functional.cross_entropy(logits.t(), lab)) / 2

    secs, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        # bf16: autocast runs the matmuls in bf16 (fp32 weights, grads, AdamW)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i > 0:
            secs.append(dt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return statistics.median(secs), losses[0], losses[-1], rss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--model")
    ap.add_argument("--precision", default="fp32,bf16",
                    help="comma-separated: fp32 (plain), bf16 (C --precision bf16 beside "
                         "PyTorch bf16 autocast)")
    a = ap.parse_args()
    precs = [p for p in a.precision.split(",") if p]
    if not precs or any(p not in ("fp32", "bf16") for p in precs):
        ap.error("--precision takes fp32 and/or bf16")
    rows = {}
    tmp = None
    model = a.model
    if not model:
        tmp = tempfile.mkdtemp()
        model = os.path.join(tmp, "b32")
        subprocess.run([sys.executable, str(ROOT / "tools" / "gen_model.py"), model, "--size", "b32",
                        "--seed", "1"], check=True, capture_output=True)
    try:
        tool = ROOT / "build" / "bench" / "bench_train"
        subprocess.run(["make", "-s", "-j2", str(tool.relative_to(ROOT))], cwd=ROOT, check=True)
        for prec in precs:
            p = subprocess.run([str(tool), model, "--batch", str(a.batch), "--steps", str(a.steps),
                                "--tokens", str(a.tokens), "--precision", prec],
                               capture_output=True, text=True, check=True)
            c = dict(kv.split("=") for kv in p.stdout.split())
            # PyTorch in a child process, so that its peak RSS is its own
            code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
                    "import bench_train as b; print(*b.torch_step(%r, %d, %d, %d, %r))"
                    % (str(ROOT / "tools"), str(ROOT / "bench"), model, a.batch, a.steps,
                       a.tokens, prec))
            q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True)
            rows[prec] = (c, *map(float, q.stdout.split()[-4:]))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cpu, isa = cpu_facts()
    c0 = next(iter(rows.values()))[0]
    print(f"CPU: {cpu}; ISA: {' '.join(isa)}; C GEMM threads: {c0['threads']}; torch threads: 2")
    print(f"ViT-B/32 training step, batch {a.batch}, texts of {a.tokens} tokens, "
          f"median of {a.steps} steps (1 warm-up excluded)")
    print(f"{'':16} {'s/step':>8} {'pairs/s':>8} {'loss first':>10} {'loss last':>10} "
          f"{'peak RSS MB':>11} {'cores busy':>10}  GEMM")
    for prec, (c, t_s, t_first, t_last, t_rss) in rows.items():
        c_s = float(c["median_s"])
        print(f"{'clipdb C ' + prec:16} {c_s:8.3f} {a.batch / c_s:8.2f} "
              f"{float(c['loss_first']):10.4f} {float(c['loss_last']):10.4f} "
              f"{float(c['peak_rss_mb']):11.0f} {float(c['cores_busy']):10.2f}  {c['gemm']}")
        print(f"{'PyTorch ' + prec:16} {t_s:8.3f} {a.batch / t_s:8.2f} {t_first:10.4f} "
              f"{t_last:10.4f} {t_rss:11.0f} {'':>10}  "
              f"{'bf16 autocast' if prec == 'bf16' else 'fp32'}")
    for prec, (c, t_s, *_rest) in rows.items():
        print(f"ratio {prec} (C pairs/s / PyTorch pairs/s): {t_s / float(c['median_s']):.2f}x")
    if "fp32" in rows and "bf16" in rows:
        print(f"C bf16 / C fp32 pairs/s: "
              f"{float(rows['fp32'][0]['median_s']) / float(rows['bf16'][0]['median_s']):.2f}x")


if __name__ == "__main__":
    main()
