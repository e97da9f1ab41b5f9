"""Black-box tests of `clipdb model fetch` and `clipdb model info` against
tools/fake_hub.py, a stand-in for huggingface.co on 127.0.0.1 (no network).

The hub serves a tiny generated model (tools/gen_model.py --size tiny --keys hf)
under openai/clip-vit-base-patch32, with fault switches set per test through
its /_control URL and its request log read through /_log.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from conftest import ROOT, run  # noqa: E402

PY = "/usr/bin/python3"
NAME = "openai/clip-vit-base-patch32"
FILES = ["model.safetensors", "vocab.json", "merges.txt"]
T = 60  # bound on every clipdb run


class Hub:
    def __init__(self, root):
        self.root = root
        self.proc = subprocess.Popen([PY, str(ROOT / "tools" / "fake_hub.py"), str(root)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"fake_hub.py did not print a port: {line!r}"
        self.url = f"http://127.0.0.1:{int(line)}"

    def call(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read()

    def faults(self, **kw):
        q = "&".join(["reset=1"] + [f"{k}={v}" for k, v in kw.items()])
        self.call("/_control?" + q)

    def log(self):
        return json.loads(self.call("/_log"))

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, shared):
    # gen_model.py derives vocab.json/merges.txt from the shared BPE file.
    root = tmp_path_factory.mktemp("hub")
    src = root / "openai" / "clip-vit-base-patch32"
    subprocess.run([PY, str(ROOT / "tools" / "gen_model.py"), str(src), "--size", "tiny",
                    "--keys", "hf"], check=True, timeout=120, capture_output=True)
    for f in FILES:
        assert (src / f).is_file(), f"gen_model.py wrote no {f}"
    h = Hub(root)
    h.src = src
    yield h
    h.close()


@pytest.fixture
def hubf(hub):
    hub.faults()  # no faults, empty log
    yield hub
    hub.faults()


def fetch(hub, dest, *extra, env=None, name=NAME):
    return run("model", "fetch", name, dest, "--base-url", hub.url, *extra, timeout=T, env=env)


def same_files(src, dest, files=FILES):
    for f in files:
        assert (dest / f).read_bytes() == (src / f).read_bytes(), f"{f} differs"
    assert not list(dest.glob("*.part")), "a .part file was left behind"


def gets(log, fname):
    return [r for r in log if r["method"] == "GET" and r["path"].endswith("/" + fname)]


def test_help():
    p = run("model", "--help")
    assert p.returncode == 0
    for s in ("usage: clipdb model info DIR", "clipdb model fetch NAME DIR", "--base-url",
              "--no-progress", "--json", "resume", "examples:"):
        assert s in p.stdout, s
    assert "model" in run("--help").stdout
    p = run("model")
    assert p.returncode == 2 and "info or fetch" in p.stderr
    p = run("model", "fetch", NAME)
    assert p.returncode == 2 and "NAME and DIR" in p.stderr
    p = run("model", "fetch", NAME, "d", "--bogus")
    assert p.returncode == 2 and "--bogus" in p.stderr
    p = run("model", "fetch", NAME, "d", "--timeout", "x")
    assert p.returncode == 2
    p = run("model", "frob")
    assert p.returncode == 2


def test_full_fetch_then_skip(hubf, tmp_path):
    dest = tmp_path / "a" / "b"   # created like mkdir -p
    p = fetch(hubf, dest)
    assert p.returncode == 0, p.stderr
    same_files(hubf.src, dest)
    # stderr is a pipe, not a terminal: plain progress lines, one per event.
    lines = p.stderr.splitlines()
    assert any(l.startswith("model.safetensors: ") and "(100%)" in l for l in lines), p.stderr
    assert any(l.startswith("merges.txt: ") for l in lines), p.stderr
    assert "\r" not in p.stderr
    log = hubf.log()
    assert all(r["user_agent"] == "clipdb/0.1.0" for r in log)
    # The weights went through the hub's redirect to the CDN, like HF's LFS files.
    assert [r["status"] for r in gets(log, "model.safetensors")] == [302, 200]
    # HEAD stops at the hub's answer with X-Linked-Size (CDN URLs are signed
    # for GET); files the hub serves itself are answered directly.
    heads = [(r["path"].rsplit("/", 1)[1], r["status"]) for r in log if r["method"] == "HEAD"]
    assert heads == [("model.safetensors", 302), ("vocab.json", 200), ("merges.txt", 200)], heads
    # Again: everything is complete, so only HEAD requests are made.
    hubf.faults()
    p = fetch(hubf, dest)
    assert p.returncode == 0, p.stderr
    assert "already complete" in p.stderr
    assert not [r for r in hubf.log() if r["method"] == "GET"]
    same_files(hubf.src, dest)


def test_no_progress(hubf, tmp_path):
    p = fetch(hubf, tmp_path, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    same_files(hubf.src, tmp_path)


def test_env_base_url(hubf, tmp_path):
    p = run("model", "fetch", NAME, tmp_path, "--no-progress", timeout=T,
            env={"CLIPDB_HF_BASE_URL": hubf.url + "/"})
    assert p.returncode == 0, p.stderr
    same_files(hubf.src, tmp_path)


def test_interrupted_then_resumed(hubf, tmp_path):
    cut = 3_000_000
    hubf.faults(drop_after=cut, fault_file="model.safetensors")
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1
    assert p.stderr.count("\n") >= 1 and "resume" in p.stderr.splitlines()[-1], p.stderr
    part = tmp_path / "model.safetensors.part"
    assert part.is_file() and not (tmp_path / "model.safetensors").exists()
    have = part.stat().st_size
    assert 0 < have <= cut
    assert part.read_bytes() == (hubf.src / "model.safetensors").read_bytes()[:have]

    hubf.faults()
    p = fetch(hubf, tmp_path)
    assert p.returncode == 0, p.stderr
    same_files(hubf.src, tmp_path)
    g = gets(hubf.log(), "model.safetensors")
    # The Range request follows the redirect; the CDN answered 206.
    assert g[-1]["range"] == f"bytes={have}-" and g[-1]["status"] == 206, g


def test_server_ignores_range(hubf, tmp_path):
    # A .part whose bytes are wrong: only a clean restart gives the right file.
    (tmp_path / "model.safetensors.part").write_bytes(b"\xAA" * 1_000_000)
    hubf.faults(ignore_range=1)
    p = fetch(hubf, tmp_path)
    assert p.returncode == 0, p.stderr
    same_files(hubf.src, tmp_path)
    g = gets(hubf.log(), "model.safetensors")
    assert g[-1]["range"] == "bytes=1000000-" and g[-1]["status"] == 200, g


def test_bad_prefix_fails_sha256(hubf, tmp_path):
    # The server honours Range, so the wrong prefix stays: the SHA-256 from
    # X-Linked-Etag catches it and the .part is removed.
    (tmp_path / "model.safetensors.part").write_bytes(b"\xAA" * 1_000_000)
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1
    assert "SHA-256" in p.stderr and "removed" in p.stderr, p.stderr
    assert not (tmp_path / "model.safetensors.part").exists()
    assert not (tmp_path / "model.safetensors").exists()
    # Run again: a fresh download succeeds.
    hubf.faults()
    assert fetch(hubf, tmp_path).returncode == 0
    same_files(hubf.src, tmp_path)


def test_corrupt_body(hubf, tmp_path):
    hubf.faults(corrupt=1, fault_file="model.safetensors")
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1 and "SHA-256" in p.stderr, p.stderr
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("fname", ["model.safetensors", "vocab.json"])
@pytest.mark.parametrize("delta", [1000, -1000])
def test_size_lie(hubf, tmp_path, delta, fname):
    # HEAD announces a size the body does not have (X-Linked-Size on the
    # hub's redirect for the LFS file, Content-Length for the plain one).
    hubf.faults(lie_size=delta, fault_file=fname)
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1
    real = (hubf.src / fname).stat().st_size
    assert f"announced {real + delta} bytes but sends {real}" in p.stderr, p.stderr
    assert not (tmp_path / fname).exists()
    assert not (tmp_path / (fname + ".part")).exists()  # nothing written: no .part left


def test_size_lie_linked_only(hubf, tmp_path):
    # Only the hub's X-Linked-Size lies: HEAD stops at the hub's redirect (as
    # huggingface_hub does), and the CDN's Content-Length on the GET disagrees.
    real = (hubf.src / "model.safetensors").stat().st_size
    hubf.faults(lie_linked=7, fault_file="model.safetensors")
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1
    assert f"announced {real + 7} bytes but sends {real}" in p.stderr, p.stderr
    heads = [r for r in hubf.log() if r["method"] == "HEAD"]
    assert [r["status"] for r in heads] == [302], heads


def test_long_body_is_cut(hubf, tmp_path):
    # No Content-Length on the body and a size announced 1000 bytes short:
    # the transfer stops when it passes the announced size.
    hubf.faults(lie_size=-1000, no_length=1, fault_file="model.safetensors")
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1
    assert "more than the" in p.stderr and "removed" in p.stderr, p.stderr
    assert not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.part").exists()


def test_no_linked_headers(hubf, tmp_path):
    # Without X-Linked-*: the size comes from Content-Length, no SHA-256 check.
    hubf.faults(no_linked=1)
    p = fetch(hubf, tmp_path)
    assert p.returncode == 0, p.stderr
    same_files(hubf.src, tmp_path)


@pytest.mark.parametrize("status", [404, 500])
def test_http_error(hubf, tmp_path, status):
    hubf.faults(status=status)
    p = fetch(hubf, tmp_path)
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("clipdb model: ")
    assert f"{hubf.url}/{NAME}/resolve/main/model.safetensors" in line, line
    assert f"HTTP {status}" in line, line


def test_unknown_model(hubf, tmp_path):
    p = fetch(hubf, tmp_path, name="openai/no-such-model")
    assert p.returncode == 1 and "HTTP 404" in p.stderr and "no-such-model" in p.stderr


def test_closed_port(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = run("model", "fetch", NAME, tmp_path, "--base-url", f"http://127.0.0.1:{port}",
            timeout=T)
    assert p.returncode == 1
    assert f"127.0.0.1:{port}" in p.stderr and "connect" in p.stderr.lower(), p.stderr


def test_unknown_host(tmp_path):
    t0 = time.monotonic()
    p = run("model", "fetch", NAME, tmp_path, "--base-url", "http://no-such-host.invalid",
            timeout=T)
    assert p.returncode == 1
    assert "no-such-host.invalid" in p.stderr and "resolve" in p.stderr.lower(), p.stderr
    assert time.monotonic() - t0 < T


def test_stall_times_out(hubf, tmp_path):
    hubf.faults(stall_after=500_000, fault_file="model.safetensors")
    t0 = time.monotonic()
    p = fetch(hubf, tmp_path, "--timeout", "1")
    assert p.returncode == 1
    assert time.monotonic() - t0 < 15
    assert "resume" in p.stderr, p.stderr
    assert (tmp_path / "model.safetensors.part").stat().st_size == 500_000


@pytest.mark.parametrize("name", ["../etc", "openai", "a/b/c", "a/b c", "a/-x", "a/.hidden"])
def test_bad_names(tmp_path, name):
    p = run("model", "fetch", name, tmp_path, "--base-url", "http://127.0.0.1:9", timeout=T)
    assert p.returncode == 1 and "ORG/NAME" in p.stderr, p.stderr


def test_bad_base_url(tmp_path):
    p = run("model", "fetch", NAME, tmp_path, "--base-url", "file:///etc", timeout=T)
    assert p.returncode == 1 and "http" in p.stderr


def test_concurrent_fetch_is_refused(hubf, tmp_path):
    # A second fetch into the same directory while the first holds the .part
    # (stalled by the hub) fails at once instead of writing the same file.
    hubf.faults(stall_after=200_000, fault_file="model.safetensors")
    first = subprocess.Popen([os.environ.get("CLIPDB_BIN", str(ROOT / "build" / "clipdb")),
                              "model", "fetch", NAME, str(tmp_path), "--base-url", hubf.url,
                              "--timeout", "3", "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        part = tmp_path / "model.safetensors.part"
        for _ in range(100):
            if part.exists() and part.stat().st_size > 0:
                break
            time.sleep(0.05)
        p = fetch(hubf, tmp_path)
        assert p.returncode == 1 and "another fetch is writing it" in p.stderr, p.stderr
    finally:
        first.wait(30)
    assert first.returncode == 1


def test_dir_is_a_file(hubf, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = fetch(hubf, f / "sub")
    assert p.returncode == 1 and "mkdir" in p.stderr, p.stderr


def test_open_clip_layout_optional_tokenizer(hubf, tmp_path):
    # timm/* repositories: open_clip_model.safetensors; the tokenizer files
    # are optional (404 skips them).
    repo = hubf.root / "timm" / "vit_tiny_clip.test"
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copy(hubf.src / "model.safetensors", repo / "open_clip_model.safetensors")
    p = fetch(hubf, tmp_path, name="timm/vit_tiny_clip.test")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "open_clip_model.safetensors").read_bytes() == \
        (hubf.src / "model.safetensors").read_bytes()
    assert not (tmp_path / "vocab.json").exists()


def test_not_safetensors_is_rejected(hubf, tmp_path):
    repo = hubf.root / "openai" / "garbage-model"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "model.safetensors").write_bytes(os.urandom(100_000))
    p = fetch(hubf, tmp_path, name="openai/garbage-model")
    assert p.returncode == 1 and "safetensors" in p.stderr, p.stderr
    assert not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.part").exists()


def test_info_on_fetched_model(hubf, tmp_path):
    p = fetch(hubf, tmp_path, "--no-progress")
    assert p.returncode == 0, p.stderr
    p = run("model", "info", tmp_path, "--json", timeout=T)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    # tools/gen_model.py --size tiny: vision 64 x 2, patch 32; text 64 x 2; embed 32.
    assert info["embed_dim"] == 32
    assert (info["vision_width"], info["vision_layers"], info["vision_heads"]) == (64, 2, 1)
    assert (info["text_width"], info["text_layers"], info["text_heads"]) == (64, 2, 1)
    assert (info["image_size"], info["patch_size"]) == (224, 32)
    assert (info["context_length"], info["vocab_size"]) == (77, 49408)
    assert info["key_style"] == "hf" and info["weights_dtype"] == "F32"
    assert info["weights_bytes"] == (hubf.src / "model.safetensors").stat().st_size
    assert info["identity"].startswith("clip-")
    p = run("model", "info", tmp_path, timeout=T)
    assert p.returncode == 0 and info["identity"] in p.stdout and "width 64" in p.stdout


def test_info_errors(tmp_path):
    p = run("model", "info", tmp_path / "nope", timeout=T)
    assert p.returncode == 1 and p.stderr.startswith("clipdb model: ")
    p = run("model", "info")
    assert p.returncode == 2
    p = run("model", "info", tmp_path, "--yaml")
    assert p.returncode == 2
