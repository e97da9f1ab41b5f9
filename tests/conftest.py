"""Shared fixtures for the black-box (tests/cli) and reference (tests/ref) tests.

The binary under test is $CLIPDB_BIN (the Makefile sets it); the shared data
is ../shared from the repository root, or $CLIPDB_SHARED. Tests that need the
shared data skip with a clear message when it is absent.
"""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = os.environ.get("CLIPDB_BIN", str(ROOT / "build" / "clipdb"))
SHARED = pathlib.Path(os.environ.get("CLIPDB_SHARED", str(ROOT.parent / "shared")))
ASAN = bool(os.environ.get("CLIPDB_ASAN"))


def run(*args, check=False, input=None, timeout=600, env=None):
    """Runs the clipdb binary; returns CompletedProcess with text output."""
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                       input=input, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"clipdb {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def shared():
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set CLIPDB_SHARED); skipping")
    return SHARED


@pytest.fixture(scope="session")
def coco(shared):
    """The COCO subset of ../shared (images + captions.jsonl); skips without it."""
    d = shared / "data" / "coco-subset"
    if not (d / "images").is_dir():
        pytest.skip(f"{d} not found; skipping")
    return d


@pytest.fixture(scope="session")
def bpe_vocab(shared):
    p = shared / "models" / "clip-vit-b-32" / "bpe_simple_vocab_16e6.txt.gz"
    if not p.is_file():
        pytest.skip(f"{p} not found; skipping")
    return p


def gen_model(path, size="tiny", keys="openai", dtype="F32", seed=1, *extra):
    """Writes a seeded random model directory with tools/gen_model.py; returns path."""
    subprocess.run(["/usr/bin/python3", str(ROOT / "tools" / "gen_model.py"), str(path),
                    "--size", size, "--keys", keys, "--dtype", dtype, "--seed", str(seed),
                    *extra], check=True, capture_output=True)
    return path


def one_line_failure(p, cmd, *needles):
    """Asserts a clean failure of `clipdb CMD`: exit 1, one stderr line
    "clipdb CMD: ..." containing every needle, no sanitizer report."""
    assert p.returncode == 1, (p.returncode, p.stdout[:200], p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"clipdb {cmd}: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr
    return lines[0]
