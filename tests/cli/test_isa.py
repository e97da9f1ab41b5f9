"""oneDNN's instruction set forced down (ONEDNN_MAX_CPU_ISA) under `clipdb embed`,
images and texts, each precision (issue 7, "Proof"): for every ISA level this CPU
has, `clipdb version --verbose` reports the forced level, the vectors agree with
the unforced run (fp32 relative error <= 1e-5, bf16 cosine >= 0.999, int8 >= 0.99),
and the matmul oneDNN ran is the one expected at that level, read from its own
trace (ONEDNN_VERBOSE=1):
  - bf16 below avx512_core: oneDNN 2.6 refuses a bf16 matmul, so clipdb EMULATES
    it (onednn.c: fp32 matmul on bf16-rounded weights and inputs, src f32);
  - bf16 on avx512_core / avx512_core_vnni: bf16 data through oneDNN's gemm:jit,
    which emulates bf16 arithmetic with AVX-512 instructions;
  - bf16 from avx512_core_bf16 up, int8 from avx512_core_vnni up: brgemm kernels
    (brg:...), on the fixed-row pieces of onednn.c.
The levels and what ran are printed (pytest -s)."""
import json

import numpy as np
import pytest

from conftest import gen_model, run
from test_compute import ISAS, available_isas, cos_rows, describe

BF16_NATIVE = ("avx512_core_bf16", "avx512_core_amx")
VNNI = ("avx512_core_vnni", "avx512_core_bf16", "avx512_core_amx")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("m") / "small", "small", "openai", "F32", 11)


@pytest.fixture(scope="module")
def inputs(shared):
    imgs = sorted((shared / "data" / "flickr8k" / "images").glob("*.jpg"))[:2]
    caps = []
    with open(shared / "data" / "flickr8k" / "captions.jsonl") as f:
        for line in f:
            caps += json.loads(line)["captions"][:1]
            if len(caps) >= 3:
                break
    return [str(p) for p in imgs], caps


def embed_traced(model, images, texts, precision, env):
    """Vectors (texts first, then images) and the matmul lines of oneDNN's trace."""
    args = ["embed", "--model", model, "--json", "--precision", precision]
    for t in texts:
        args += ["--text", t]
    for p in images:
        args += ["--image", p]
    p = run(*args, env={"ONEDNN_VERBOSE": "1", **env})
    assert p.returncode == 0, p.stderr
    vecs = [json.loads(l)["embedding"] for l in p.stdout.splitlines() if l.startswith("{")]
    mm = [l.split(",") for l in p.stdout.splitlines()
          if l.startswith("onednn_verbose,exec,cpu,matmul,")]
    # fields: 4 the implementation, 6 the memory descriptors (src_<type>:... first)
    return np.array(vecs, np.float32), {(f[4], f[6].split(":")[0]) for f in mm}


def test_forced_isa_is_reported_and_answers_agree(model, inputs):
    images, caps = inputs
    isas = available_isas()
    assert "avx2" in isas
    base = {prec: embed_traced(model, images, caps, prec, {})[0] for prec in ("fp32", "bf16", "int8")}
    for isa in isas:
        env = {"ONEDNN_MAX_CPU_ISA": isa}
        assert describe(env) == ["onednn", isa]
        for prec in ("fp32", "bf16", "int8"):
            got, ran = embed_traced(model, images, caps, prec, env)
            ref = base[prec]
            rel = float(np.abs(got - ref).max() / np.abs(ref).max())
            c = float(cos_rows(got, ref).min())
            print(f"\n{isa:17s} {prec}: rel err {rel:.2e}, min cos {c:.6f} "
                  f"(texts and images) to the unforced run; ran {sorted(ran)}")
            assert ran, (isa, prec)
            impls = {i for i, _ in ran}
            srcs = {s for _, s in ran}
            if prec == "fp32":
                assert rel <= 1e-5, (isa, rel)
                assert srcs == {"src_f32"}
            elif prec == "bf16":
                assert c >= 0.999, (isa, c)
                if isa in ("avx2",):
                    assert srcs == {"src_f32"}, ran  # emulated by clipdb
                else:
                    assert srcs == {"src_bf16"}, ran
                if isa in BF16_NATIVE:
                    assert all(i.startswith("brg:") for i in impls), ran
            else:
                assert c >= 0.99, (isa, c)
                assert srcs == {"src_u8"}, ran  # codes + 128 (onednn.c)
                if isa in VNNI:
                    assert all(i.startswith("brg:") for i in impls), ran


def test_an_isa_above_the_cpu_is_not_reported():
    """Forcing a level the CPU lacks leaves oneDNN at the CPU's best: the
    report names what runs, never what was asked for."""
    best = describe({})[1]
    for isa in ISAS:
        got = describe({"ONEDNN_MAX_CPU_ISA": isa})[1]
        if isa not in available_isas():
            assert got != isa and got in ISAS
        assert ISAS.index(got) <= ISAS.index(best) if best in ISAS else True
